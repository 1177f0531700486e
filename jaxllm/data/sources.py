"""Document sources. The built-in corpus is the running interpreter's standard library: its `.py` sources
(tests excluded) and the pydoc topic texts — real code and prose that ship with every Python, no download."""

from __future__ import annotations

import glob
import json
import logging
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jaxllm.errors import JaxllmError

log = logging.getLogger(__name__)


class DataError(JaxllmError):
    """A user's data mistake (missing file, malformed input, a source filtered to nothing); one line."""

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(path)
    return files


def builtin_documents() -> list[tuple[str, str]]:
    """(name, text) pairs, in a fixed order: stdlib modules, then pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in _stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append((str(path.relative_to(root)), text))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs += [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]
    return docs


def is_heldout(name: str, fraction: float) -> bool:
    """Deterministic split by document name (the same on every machine and run)."""
    return zlib.crc32(name.encode()) % 10_000 < fraction * 10_000


def split_documents(docs: list[tuple[str, str]], fraction: float) -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for name, text in docs:
        (heldout if is_heldout(name, fraction) else train).append(text)
    return train, heldout


# ---------------------------------------------------------------------------------------------------------
# File sources for `jaxllm data build`: text files (one document each), JSONL (a field), Parquet (a column).
# Each reader yields (name, text) with name = "file:line" (or "file:row"), and counts what it had to skip.


@dataclass
class ReadStats:
    """What a reader saw: records read, records skipped as malformed (with their file:line)."""

    records: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)  # the first few "file:line: why"

    def skip(self, where: str, why: str, max_warnings: int = 10) -> None:
        self.malformed += 1
        if len(self.examples) < 100:
            self.examples.append(f"{where}: {why}")
        if self.malformed <= max_warnings:
            log.warning("skipping %s: %s", where, why)
        elif self.malformed == max_warnings + 1:
            log.warning("further malformed records are counted without a warning each")


def expand_paths(pattern: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """A file, a directory (searched recursively) or a glob -> sorted files. Sorted: builds are reproducible."""
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    if suffixes:
        files = [p for p in files if p.name.endswith(suffixes)]
    return sorted(files)


def _decode(data: bytes, where: str, stats: ReadStats) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        stats.skip(f"{where}:{line}", f"undecodable bytes (not UTF-8) at byte {e.start}")
        return None


def read_text_files(files: list[Path], stats: ReadStats) -> Iterator[tuple[str, str]]:
    """One document per file."""
    for path in files:
        stats.records += 1
        text = _decode(path.read_bytes(), str(path), stats)
        if text is not None:
            yield f"{path}", text


def read_jsonl(files: list[Path], field_name: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    """One document per line: the string at `field_name`. Blank lines are ignored."""
    for path in files:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                stats.records += 1
                where = f"{path}:{lineno}"
                line = _decode(raw, where, stats)
                if line is None:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    stats.skip(where, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                text = record.get(field_name) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    stats.skip(where, f"no string field {field_name!r}")
                    continue
                yield where, text


def read_parquet(files: list[Path], column: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    """One document per row: the string in `column`; null rows are skipped and counted."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        if column not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                            "set the source's field")
        row = 0
        for batch in pf.iter_batches(columns=[column], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                stats.records += 1
                if not isinstance(text, str):
                    stats.skip(f"{path}:row {row}", f"column {column!r} is not a string ({type(text).__name__})")
                    continue
                yield f"{path}:{row}", text
