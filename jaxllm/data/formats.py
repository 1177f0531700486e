"""Fine-tuning data formats: chat templates, SFT records (instruction or chat), preference pairs; encoding
with a loss mask, long-example policy, and packing into fixed-length rows.

Records (one JSON object per line):
  instruction  {"instruction": str, "input": str (may be empty or absent), "output": str}
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  preference   {"prompt": str, "chosen": str, "rejected": str}
               {"prompt": str, "response_A": str, "response_B": str, "preference": "A"|"B"}

Every record becomes a list of messages, rendered by a ChatTemplate piece by piece: each message is
`prefix[role] + content + end`, and token ids are made per piece, so the loss mask is exact: the tokens of
every assistant message's content and its `end` marker are targets (loss_mask = 1); role prefixes, system
and user turns, and padding are not. Special tokens (`<|...|>` in the template) are added to the tokenizer;
see stages/sft.py for how the embedding grows to hold them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxllm.data.pipeline import DataError
from jaxllm.data.sources import is_heldout

log = logging.getLogger(__name__)
_SPECIAL = re.compile(r"<\|[^|<>]+\|>")


@dataclass(frozen=True)
class ChatTemplate:
    """Strings around each message. Any `<|name|>` inside them becomes one special token."""

    system: str = "<|system|>\n"
    user: str = "<|user|>\n"
    assistant: str = "<|assistant|>\n"
    end: str = "<|end|>"

    def prefix(self, role: str) -> str:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]


ROLES = ("system", "user", "assistant")


def special_tokens(template: ChatTemplate) -> list[str]:
    """The template's special tokens, in order of first appearance (deterministic ids when added)."""
    found: list[str] = []
    for text in (template.system, template.user, template.assistant, template.end):
        found += [t for t in _SPECIAL.findall(text) if t not in found]
    return found


def add_special_tokens(tok: Tokenizer, template: ChatTemplate) -> list[int]:
    """Add the template's special tokens that `tok` lacks (new ids follow the vocab); return all their ids."""
    missing = [t for t in special_tokens(template) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return [tok.token_to_id(t) for t in special_tokens(template)]


@dataclass(frozen=True)
class Encoded:
    """One example. ids, loss_mask: [L] int32; response_start: index of the last assistant turn's prefix."""

    ids: np.ndarray
    loss_mask: np.ndarray
    response_start: int


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids if text else []


def render(tok: Tokenizer, template: ChatTemplate, messages: list[dict], *,
           add_generation_prompt: bool = False) -> Encoded:
    """Token ids and loss mask of a conversation. With add_generation_prompt, the assistant prefix is
    appended (a prompt for sampling). Messages must already be validated (see check_messages)."""
    ids: list[int] = []
    mask: list[int] = []
    response_start = 0
    for m in messages:
        prefix = _ids(tok, template.prefix(m["role"]))
        body = _ids(tok, m["content"]) + _ids(tok, template.end)
        if m["role"] == "assistant":
            response_start = len(ids)
        target = 1 if m["role"] == "assistant" else 0
        ids += prefix + body
        mask += [0] * len(prefix) + [target] * len(body)
    if add_generation_prompt:
        response_start = len(ids)
        prefix = _ids(tok, template.assistant)
        ids += prefix
        mask += [0] * len(prefix)
    return Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32), response_start)


def fit_length(ex: Encoded, seq_len: int, policy: str) -> Encoded | None:
    """Make an example fit seq_len tokens, or None (dropped).

    policy "truncate": cut the prompt from the left, keeping the last assistant turn (prefix included)
    whole; dropped if that turn alone is longer than seq_len. policy "drop": drop every long example.
    """
    n = len(ex.ids)
    if n <= seq_len:
        return ex
    if policy == "drop" or n - ex.response_start > seq_len:
        return None
    cut = n - seq_len
    return Encoded(ex.ids[cut:], ex.loss_mask[cut:], ex.response_start - cut)


# ---------------------------------------------------------------------------------------------------------
# Records -> messages, with validation that names file:line.


class BadRecord(ValueError):
    """One malformed record; the message says what is wrong (the caller adds file:line)."""


def _text(record: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise BadRecord(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def check_messages(messages, template: ChatTemplate) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord(f"message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRecord(f"message {i} has role {m['role']!r}, which the template does not know "
                            f"(known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise BadRecord(f"message {i} content must be a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord(f"message {i} is an empty assistant response")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRecord("the chat has no assistant turn (nothing to learn)")
    return out


def instruction_messages(record: dict) -> list[dict]:
    """Alpaca style: user = instruction (+ blank line + input when non-empty); assistant = output."""
    instruction = _text(record, "instruction")
    extra = _text(record, "input", allow_empty=True) if "input" in record else ""
    output = _text(record, "output")
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def sft_messages(record, template: ChatTemplate) -> list[dict]:
    if not isinstance(record, dict):
        raise BadRecord("a record must be a JSON object")
    if "messages" in record:
        return check_messages(record["messages"], template)
    if "instruction" in record or "output" in record:
        return instruction_messages(record)
    raise BadRecord("unknown record: expected 'messages' or 'instruction'/'input'/'output' fields")


def preference_triple(record) -> tuple[str, str, str] | None:
    """(prompt, chosen, rejected); None for a tie (counted separately)."""
    if not isinstance(record, dict):
        raise BadRecord("a record must be a JSON object")
    prompt = _text(record, "prompt")
    if "chosen" in record or "rejected" in record:
        chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    else:
        a, b = _text(record, "response_A"), _text(record, "response_B")
        if "preference" not in record:
            raise BadRecord("missing field 'preference' (\"A\", \"B\" or \"tie\")")
        pref = record["preference"]
        if pref in ("tie", None):
            return None
        if pref not in ("A", "B"):
            raise BadRecord(f"field 'preference' must be 'A' or 'B', got {pref!r}")
        chosen, rejected = (a, b) if pref == "A" else (b, a)
    if chosen == rejected:
        return None
    return prompt, chosen, rejected


@dataclass
class Counts:
    """What happened to the records of one source (logged, and written to the run's data_report.json)."""

    records: int = 0
    kept: int = 0
    bad: int = 0
    ties: int = 0
    truncated: int = 0
    dropped_long: int = 0
    first_errors: list = dataclasses.field(default_factory=list)

    def bad_record(self, where: str, err: Exception) -> None:
        self.bad += 1
        if len(self.first_errors) < 20:
            self.first_errors.append(f"{where}: {err}")
            log.warning("skipping %s: %s", where, err)

    def check_ratio(self, max_bad_ratio: float, what: str) -> None:
        if self.records and self.bad / self.records > max_bad_ratio:
            raise DataError(f"{what}: {self.bad} of {self.records} records are malformed (first: "
                            f"{self.first_errors[0]}); fix the file or raise data.max_bad_ratio="
                            f"{max_bad_ratio}")


def read_jsonl(path: str | Path, counts: Counts):
    """Yield (where, record) with where = 'file:line'; bad JSON lines are counted and skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; pass data.path=<file.jsonl> or data.path=builtin")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            counts.records += 1
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                counts.bad_record(where, BadRecord(f"invalid JSON ({e.msg})"))


# ---------------------------------------------------------------------------------------------------------
# Rows: packing several examples per row, or one padded example per row.


def pack_examples(examples: list[Encoded], seq_len: int, pad_id: int, *, pack: bool) -> dict[str, np.ndarray]:
    """Rows [N, seq_len] of tokens, positions, segment_ids, loss_mask.

    pack=True: examples are laid in order into a row while they fit (greedy, deterministic); each gets the
    next segment id (1, 2, ...) and positions restarting at 0. pack=False: one example per row. The rest
    of a row is padding: segment 0, loss_mask 0, token pad_id.
    """
    rows: list[list[Encoded]] = []
    used = seq_len + 1
    for ex in examples:
        if len(ex.ids) > seq_len:
            raise ValueError(f"example of {len(ex.ids)} tokens > seq_len={seq_len}; call fit_length first")
        if not pack or used + len(ex.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.ids)
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    out["tokens"][:] = pad_id
    for r, row in enumerate(rows):
        start = 0
        for seg, ex in enumerate(row, 1):
            sl = slice(start, start + len(ex.ids))
            out["tokens"][r, sl] = ex.ids
            out["positions"][r, sl] = np.arange(len(ex.ids))
            out["segment_ids"][r, sl] = seg
            out["loss_mask"][r, sl] = ex.loss_mask
            start += len(ex.ids)
    return out


class Rows:
    """Random-access rows (a Grain data source) over arrays [N, T]."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[int(index)] for k, v in self.arrays.items()}


# ---------------------------------------------------------------------------------------------------------
# Reward-model sequences: prompt + response rendered as a two-turn chat, then EOS (the scored token).


def encode_scored(tok: Tokenizer, template: ChatTemplate, prompt: str, response: str, eos_id: int,
                  seq_len: int, policy: str) -> tuple[Encoded | None, bool]:
    """The sequence a reward model scores: user=prompt, assistant=response, then EOS; fit to seq_len.

    Returns (example or None when dropped, whether it was truncated)."""
    enc = render(tok, template, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    enc = Encoded(np.append(enc.ids, np.int32(eos_id)), np.append(enc.loss_mask, np.int32(1)), enc.response_start)
    out = fit_length(enc, seq_len, policy)
    return out, out is not None and len(out.ids) < len(enc.ids)


def pad_rows(examples: list[Encoded], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [N, seq_len] and mask [N, seq_len] (1 = real token)."""
    tokens = np.full((len(examples), seq_len), pad_id, np.int32)
    mask = np.zeros((len(examples), seq_len), np.int32)
    for i, ex in enumerate(examples):
        tokens[i, : len(ex.ids)] = ex.ids
        mask[i, : len(ex.ids)] = 1
    return tokens, mask


def read_split(path: str, heldout_path: str, heldout_fraction: float, counts: Counts):
    """(train, held-out) lists of (where, record) from JSONL: the held-out file when given, else a deterministic
    split by each record's content."""
    rows = list(read_jsonl(path, counts))
    if heldout_path:
        return rows, list(read_jsonl(heldout_path, counts))
    held = [is_heldout(json.dumps(r, sort_keys=True), heldout_fraction) for _, r in rows]
    return [x for x, h in zip(rows, held) if not h], [x for x, h in zip(rows, held) if h]
