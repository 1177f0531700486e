"""Sampling from a model.

`generate` is the fast path: prefill and decode in one jit with a pre-allocated KV cache (generate/kv_cache.py), a
`lax.while_loop` over steps that exits once every row has stopped, left-padded prompts with exact per-row
positions, greedy / temperature / top-k / top-p, stop tokens, and per-token log-probabilities.
`simple_generate` re-runs the full forward per token (no cache): small and obviously right, used as the oracle
for `generate` in tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.random import threefry2x32_p

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.data.pipeline import DataError
from jaxllm.generate import kv_cache
from jaxllm.kernels import dispatch
from jaxllm.kernels.decode import topk
from jaxllm.models import transformer
from jaxllm.parallel.rules import constrain

LOGPROBS = ("policy", "tempered", "sampler")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `generate` samples.

    logprobs says which distribution the returned per-token log-probabilities come from:
      policy   - the model's own distribution, log_softmax(logits) at temperature 1, no top-k/top-p (what PPO's
                 ratio and KL need when the trainer also scores at temperature 1; the default);
      tempered - log_softmax(logits / temperature), no top-k/top-p (the convention of trainers that also
                 divide by the sampling temperature when scoring); equals policy when temperature is 0;
      sampler  - the distribution actually sampled from: temperature, then top-k, then top-p, renormalised
                 (0.0 for greedy, whose distribution is a point mass).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_tokens: tuple[int, ...] = ()  # the stop token is emitted (mask 1), nothing after it
    logprobs: str = "policy"  # policy | tempered | sampler
    pad_id: int = 0  # written after a row stops (mask 0), and left of short prompts
    prompt_bucket: int = 16  # prompt width is rounded up to a multiple of this, to reuse compilations


def check_config(config: SamplingConfig, model_cfg: ModelConfig) -> SamplingConfig:
    """Raise ConfigError naming the bad field; return config unchanged."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"sampling.{key}={getattr(config, key)!r} {why}")

    if config.max_new_tokens < 1:
        raise bad("max_new_tokens", "must be >= 1")
    if config.max_new_tokens >= model_cfg.max_seq_len:
        raise bad("max_new_tokens", f"leaves no room for a prompt in model.max_seq_len={model_cfg.max_seq_len}")
    if not config.temperature >= 0.0:
        raise bad("temperature", "must be >= 0 (0 = greedy)")
    if not 0 <= config.top_k <= model_cfg.vocab_size:
        raise bad("top_k", f"must be in [0, vocab_size={model_cfg.vocab_size}] (0 = off)")
    if not 0.0 < config.top_p <= 1.0:
        raise bad("top_p", "must be in (0, 1] (1 = off)")
    if config.logprobs not in LOGPROBS:
        raise bad("logprobs", f"is not allowed; choose one of {', '.join(LOGPROBS)}")
    if any(not 0 <= t < model_cfg.vocab_size for t in (*config.stop_tokens, config.pad_id)):
        raise ConfigError(f"sampling.stop_tokens={config.stop_tokens} / pad_id={config.pad_id} must be token ids "
                          f"in [0, {model_cfg.vocab_size})")
    if config.prompt_bucket < 1:
        raise bad("prompt_bucket", "must be >= 1")
    return config


@partial(jax.jit, static_argnames=("cfg",))
def _next_logits(params, cfg: ModelConfig, buf: jax.Array, length: jax.Array) -> jax.Array:
    """Logits [B, V] at position length-1 of each row of buf [B, L] (right-padded)."""
    b, l = buf.shape
    positions = jnp.broadcast_to(jnp.arange(l), (b, l))
    segment_ids = (positions < length[:, None]).astype(jnp.int32)
    logits = transformer.logits(params, cfg, buf, positions, segment_ids)
    return jnp.take_along_axis(logits, (length - 1)[:, None, None], axis=1)[:, 0]


def sample_token(key: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def simple_generate(params, cfg: ModelConfig, prompt: list[int], key: jax.Array, *, max_new_tokens: int,
                    temperature: float = 1.0, eos_id: int | None = None) -> list[int]:
    """Continue one prompt; returns the new token ids (stops at eos_id, not included)."""
    if not prompt:
        raise ValueError("prompt is empty: give at least one token")
    window = cfg.max_seq_len
    if len(prompt) >= window:
        raise ValueError(f"prompt has {len(prompt)} tokens; model.max_seq_len={window} leaves no room")
    buf = jnp.zeros((1, window), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt, jnp.int32))
    length, out = len(prompt), []
    for i in range(min(max_new_tokens, window - len(prompt))):
        logits = _next_logits(params, cfg, buf, jnp.array([length]))
        token = int(sample_token(jax.random.fold_in(key, i), logits, temperature)[0])
        if eos_id is not None and token == eos_id:
            break
        out.append(token)
        buf = buf.at[0, length].set(token)
        length += 1
    return out


# ---------------------------------------------------------------------------------------------------------
# The KV-cache sampler.


def top_k_columns(x: jax.Array, k: int, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """The k largest values of each row of x [B, V], descending, and their columns: ([B, k], [B, k] int32).

    The values equal `jax.lax.top_k(x, k)[0]`; among columns tied at the k-th value, which are returned is
    not specified. Sorting a whole vocabulary row every decode step is the costliest part of top-k sampling on
    a GPU, so the row is narrowed first: its k largest values all lie in the k chunks (of `chunk` columns) with
    the largest maxima (a value outside them is below k chunk maxima, so k values are at least as large). So:
    chunk maxima, top-k of those, gather those k chunks (when there are at least 4k chunks), then an exact top-k
    of what is left. chunk=0 picks about sqrt(V / k).
    """
    b, v = x.shape
    chunk = chunk or max(8, int(math.sqrt(v / k)))
    n = -(-v // chunk)
    if n < 4 * k:  # narrowing would not pay
        values, columns = jax.lax.top_k(x, k)
        return values, columns.astype(jnp.int32)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - v)), constant_values=-jnp.inf).reshape(b, n, chunk)
    best = jax.lax.top_k(jnp.max(x, axis=-1), k)[1]  # [B, k] chunk indices
    candidates = jnp.take_along_axis(x, best[:, :, None], axis=1).reshape(b, k * chunk)  # [B, k * chunk]
    columns = (best[:, :, None] * chunk + jnp.arange(chunk)).reshape(b, k * chunk)
    values, picked = jax.lax.top_k(candidates, k)
    # A padding column (value -inf) can only be picked when fewer than k values exceed -inf; keep it in range.
    return values, jnp.minimum(jnp.take_along_axis(columns, picked, axis=1), v - 1).astype(jnp.int32)


def nucleus(ranked: jax.Array, top_p: float) -> jax.Array:
    """Top-p over values [B, N] sorted descending: -inf after the shortest prefix whose probability mass
    (softmax over the row) reaches top_p; the first value is always kept."""
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p) | (jnp.arange(ranked.shape[-1]) == 0)
    return jnp.where(keep, ranked, -jnp.inf)


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """The logits sampled from, over the whole vocabulary: divided by temperature, then top-k, then top-p.

    logits: [B, V] float32; returns [B, V] float32 with -inf outside the allowed set: the top_k largest
    (`sample_logits` samples these among the top-k candidates directly), then the smallest prefix of them (by
    descending probability) whose mass reaches top_p; the top token is always kept. Tokens tied with the last
    kept value are kept too. temperature must be > 0 here.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k == 0 and top_p >= 1.0:
        return logits
    ranked = top_k_columns(logits, top_k)[0] if top_k else -jnp.sort(-logits, axis=-1)  # [B, k or V] descending
    if top_p < 1.0:
        ranked = nucleus(ranked, top_p)
    threshold = jnp.min(jnp.where(jnp.isneginf(ranked), jnp.inf, ranked), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def token_gumbel(key: jax.Array, columns: jax.Array, step: jax.Array | int = 0) -> jax.Array:
    """Gumbel noise [B, k] float32 for candidate token ids columns [B, k] at decode step `step`, drawn per
    (step, row, token id) rather than per candidate slot: a candidate keeps its noise when tiny logit differences
    (another kernel, another backend) reorder the candidates, so such runs pick the same tokens far more often.

    A Threefry-2x32 hash of the counter pair (step * B + row, token id), keyed by two words drawn from key
    (the same every step, so a loop computes them once), gives 24 uniform bits per value: the per-step work is
    one hash, where a key per step, per row and per token (fold_in, split, fold_in, then gumbel) ran as a
    chain of about eight small kernels on a GPU."""
    words = jax.random.bits(key, (2,), jnp.uint32)
    rows = jax.lax.broadcasted_iota(jnp.uint32, columns.shape, 0) + jnp.uint32(columns.shape[0]) * jnp.uint32(step)
    bits, _ = threefry2x32_p.bind(words[0], words[1], rows, columns.astype(jnp.uint32))
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * 2.0**-24  # in (0, 1): both logs stay finite
    return -jnp.log(-jnp.log(uniform))


def sample_logits(key: jax.Array, logits: jax.Array, config: SamplingConfig, kernel: bool = False,
                  step: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """One token per row from logits [B, V] float32 -> (tokens [B] int32, logprobs [B] float32).

    key, step: the draw is a function of both; a decode loop passes one key and its step counter, so no key is
    derived per step (different steps draw independent noise).

    With top-k the draw is among the k candidates only (exactly k tokens), so the random draw and the
    renormalisation cost O(k), not O(V), per row. kernel: find the candidates and the row's log-sum-exp with
    the Pallas top-k kernel (kernels/decode/topk.py; `top_k_kernel_takes`) instead of XLA's reductions and sorts."""
    greedy = config.temperature == 0.0
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if config.logprobs == "sampler":
            return tokens, jnp.zeros(tokens.shape, jnp.float32)
    elif config.top_k:
        tokens, logprobs = _top_k_draw(key, logits.astype(jnp.float32), config, kernel, step)
        if logprobs is not None:
            return tokens, logprobs
    else:
        filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
        tokens = jax.random.categorical(jax.random.fold_in(key, step), filtered, axis=-1).astype(jnp.int32)
        if config.logprobs == "sampler":
            return tokens, jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
    source = logits / config.temperature if config.logprobs == "tempered" and not greedy else logits
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(source, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def _top_k_draw(key: jax.Array, logits: jax.Array, config: SamplingConfig, kernel: bool,
                step: jax.Array | int) -> tuple[jax.Array, jax.Array | None]:
    """Top-k (then top-p) Gumbel-max draw among the k candidates: (tokens [B], logprobs [B] or None when the
    caller computes them over the whole row). On a tie at the k-th value the XLA path does not specify which
    tied token is a candidate; the kernel takes the lowest token ids."""
    t, k = config.temperature, config.top_k
    if not kernel:
        ranked, columns = top_k_columns(logits / t, k)  # [B, k] descending
    else:  # the kernel's candidates come in column order; its lse is of logits * scale
        scale = 1.0 / t if config.logprobs == "tempered" else 1.0
        values, columns, lse = topk.top_k(logits, k, scale=scale)
        ranked = values / t
        if config.top_p < 1.0:  # the nucleus needs them in descending order
            ranked, order = jax.lax.top_k(ranked, k)
            columns, values = (jnp.take_along_axis(a, order, axis=-1) for a in (columns, values))
    if config.top_p < 1.0:
        ranked = nucleus(ranked, config.top_p)
    choice = jnp.argmax(ranked + token_gumbel(key, columns, step), axis=-1)[:, None]  # [B, 1]: Gumbel-max draw
    tokens = jnp.take_along_axis(columns, choice, axis=-1)[:, 0]
    if config.logprobs == "sampler":
        return tokens, jnp.take_along_axis(jax.nn.log_softmax(ranked, axis=-1), choice, axis=-1)[:, 0]
    if kernel:
        return tokens, jnp.take_along_axis(values, choice, axis=-1)[:, 0] * scale - lse
    return tokens, None


def top_k_kernel_takes(model_cfg: ModelConfig, config: SamplingConfig) -> bool:
    """Whether `generate_arrays` samples top-k through the Pallas kernel (kernels/dispatch.top_k_takes)."""
    return dispatch.top_k_takes(model_cfg.attention_impl, model_cfg.vocab_size, config.top_k, config.temperature)


def _prefill(top, layers, cfg: ModelConfig, prompt_tokens, kv_positions, kv_segment_ids, cache_len: int):
    """Run the prompts [B, P] through the model into a fresh cache; logits [B, V] of each row's last token."""
    b, p = prompt_tokens.shape
    cache = kv_cache.init_cache(cfg, b, cache_len)
    hidden, cache = kv_cache.forward(top, layers, cfg, prompt_tokens, kv_positions[:, :p], cache, jnp.int32(0),
                                     kv_positions, kv_segment_ids, fresh=True)
    return kv_cache.last_logits(top, cfg, hidden), cache


def generate_arrays(params, model_cfg: ModelConfig, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                    key: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pure, jittable sampler (model_cfg and config static).

    params: the model's params, or `prepare(params, model_cfg)` of them (cast and fused once, for callers that
    sample several times from the same params; otherwise each call prepares them).
    prompt_tokens: [B, P] int32, LEFT-padded (row b's prompt fills its last prompt_lengths[b] columns);
    prompt_lengths: [B] int32 >= 1, with P + max_new_tokens <= model.max_seq_len. Row b's first real token has
    position 0. Returns (tokens [B, N] int32, logprobs [B, N] float32, mask [B, N] int32) with
    N = config.max_new_tokens: the new tokens only, pad_id and logprob 0 where mask is 0 (after a stop token).
    """
    check_config(config, model_cfg)  # static values: free under jit
    b, p = prompt_tokens.shape
    n = config.max_new_tokens
    if p + n > model_cfg.max_seq_len:
        raise DataError(f"prompt width {p} + max_new_tokens={n} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    pad = p - prompt_lengths.astype(jnp.int32)  # [B]
    cache_len = -(-(p + n) // 16) * 16  # a multiple of 16 for the decode kernel's key blocks; the rest is padding
    cols = jnp.arange(cache_len, dtype=jnp.int32)[None, :]
    kv_positions = jnp.maximum(cols - pad[:, None], 0)  # [B, S]
    kv_segment_ids = ((cols >= pad[:, None]) & (cols < p + n)).astype(jnp.int32)  # [B, S]
    prepared = params if isinstance(params, kv_cache.Prepared) else kv_cache.prepare_params(params, model_cfg)
    top, layers = prepared
    logits, cache = _prefill(top, layers, model_cfg, prompt_tokens, kv_positions, kv_segment_ids, cache_len)
    stop = jnp.asarray(config.stop_tokens, jnp.int32)
    kernel = top_k_kernel_takes(model_cfg, config)
    state = {"step": jnp.int32(0), "logits": logits, "cache": cache, "done": jnp.zeros((b,), bool),
             "tokens": jnp.full((b, n), config.pad_id, jnp.int32), "logprobs": jnp.zeros((b, n), jnp.float32),
             "mask": jnp.zeros((b, n), jnp.int32)}

    def sample(state):  # draw step's token from state["logits"] and record it; no forward
        step, active = state["step"], ~state["done"]
        token, logprob = sample_logits(key, state["logits"], config, kernel, step)
        token = jnp.where(active, token, config.pad_id)
        done = state["done"] | (jnp.any(token[:, None] == stop[None, :], axis=-1) if stop.size else False)
        put = lambda buf, col: jax.lax.dynamic_update_slice_in_dim(buf, col[:, None].astype(buf.dtype), step, 1)
        return token, {**state, "done": done, "tokens": put(state["tokens"], token),
                       "logprobs": put(state["logprobs"], jnp.where(active, logprob, 0.0)),
                       "mask": put(state["mask"], active)}

    def body(state):
        token, state = sample(state)
        step = state["step"]
        positions = (prompt_lengths.astype(jnp.int32) + step)[:, None]  # [B, 1]
        hidden, cache = kv_cache.forward(top, layers, model_cfg, token[:, None], positions, state["cache"],
                                         p + step, kv_positions, kv_segment_ids)
        return {**state, "step": step + 1, "logits": kv_cache.last_logits(top, model_cfg, hidden), "cache": cache}

    # Steps 0 .. n-2 sample and run the model on their token; the last token needs no forward (its logits
    # would go unused), so it is sampled after the loop. When every row has stopped (the loop may exit early),
    # that draw finds no active row and writes pad_id / 0 / 0 into a column that already holds them.
    state = jax.lax.while_loop(lambda s: (s["step"] < n - 1) & ~jnp.all(s["done"]), body, state)
    state = sample(state)[1]
    return tuple(constrain(state[k], ("batch", None)) for k in ("tokens", "logprobs", "mask"))


@cache
def generate_jit(backend: str, d_model: int = 0):
    """generate_arrays jitted for a backend and model width: on a GPU from dispatch.CUBLAS_MIN_D_MODEL, with
    XLA's Triton GEMMs off (cuBLAS runs decode's skinny matmuls faster there)."""
    options = None
    if dispatch.cublas_for_decode(backend, d_model):
        options = {"xla_gpu_enable_triton_gemm": False}
    return jax.jit(generate_arrays, static_argnames=("model_cfg", "config"), compiler_options=options)


def as_batch(prompt_tokens: jax.Array, prompt_lengths: jax.Array, tokens: jax.Array,
             mask: jax.Array) -> dict[str, jax.Array]:
    """Prompts + sampled responses as a training batch (for scoring rollouts with `transformer.logits`).

    prompt_tokens: [B, P] left-padded, prompt_lengths: [B]; tokens, mask: [B, N] from `generate_arrays`.
    Returns {tokens, positions, segment_ids, loss_mask} each [B, P + N] int32: padding (left of the prompt and
    after a stop) has segment id 0; loss_mask is 1 on the generated tokens, so `logits[:, t - 1]` scores
    `tokens[:, t]` exactly where `generate` reported a log-probability.
    """
    p = prompt_tokens.shape[1]
    mask = mask.astype(jnp.int32)
    in_prompt = (jnp.arange(p)[None, :] >= (p - prompt_lengths)[:, None]).astype(jnp.int32)  # [B, P]
    segment_ids = jnp.concatenate([in_prompt, mask], axis=1)  # [B, P + N]
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0) * segment_ids
    return {"tokens": jnp.concatenate([prompt_tokens, tokens], axis=1).astype(jnp.int32),
            "positions": positions.astype(jnp.int32), "segment_ids": segment_ids,
            "loss_mask": jnp.concatenate([jnp.zeros_like(in_prompt), mask], axis=1)}


def pad_prompts(prompts: Sequence[Sequence[int]], model_cfg: ModelConfig,
                config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ([B, P] int32, lengths [B] int32); P a multiple of config.prompt_bucket.

    Raises DataError for an empty list, an empty prompt, or one that leaves no room for max_new_tokens.
    """
    if not len(prompts):
        raise DataError("no prompts given: pass at least one prompt")
    room = model_cfg.max_seq_len - config.max_new_tokens
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise DataError(f"prompt {i} is empty (0 tokens): give at least one token")
        if len(prompt) > room:
            raise DataError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={config.max_new_tokens} "
                            f"it must be <= {room} (model.max_seq_len={model_cfg.max_seq_len}): shorten it or "
                            "lower max_new_tokens")
    lengths = np.array([len(x) for x in prompts], np.int32)
    width = min(math.ceil(lengths.max() / config.prompt_bucket) * config.prompt_bucket, room)
    tokens = np.full((len(prompts), width), config.pad_id, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt):] = np.asarray(prompt, np.int32)
    return tokens, lengths


@partial(jax.jit, static_argnames="model_cfg")
def prepare(params, model_cfg: ModelConfig) -> kv_cache.Prepared:
    """The params as the sampler uses them (kv_cache.prepare_params): matrices in the compute dtype, q/k/v and
    gate/up fused, the layers' RMSNorm weights folded into them. Pass the result to `generate(..., prepared=)`
    or `generate_arrays` in place of params when sampling several batches from the same params (the CLI,
    evaluation): each call then skips that work (~1% of a 1b call, H200)."""
    return kv_cache.prepare_params(params, model_cfg)


def model_config(graphdef: nnx.GraphDef, params: Any) -> ModelConfig:
    return nnx.merge(graphdef, params, copy=False).cfg


def generate(graphdef: nnx.GraphDef, params, prompts, key: jax.Array, config: SamplingConfig, *,
             prepared: kv_cache.Prepared | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sample continuations of a batch of prompts with a KV cache, in one jitted call.

    prepared: `prepare(params, model_cfg)`, computed once when sampling many batches from the same params.
    prompts: a list of token-id lists (any lengths; left-padded here), or a pair (tokens [B, P] left-padded,
    lengths [B]). key: a PRNG key; the same key gives the same samples. Returns (tokens, logprobs, mask), each
    [B, max_new_tokens]; see `generate_arrays` and `SamplingConfig.logprobs` for what the log-probs are.
    """
    cfg = model_config(graphdef, params)
    check_config(config, cfg)
    if isinstance(prompts, tuple) and len(prompts) == 2 and hasattr(prompts[0], "shape"):
        tokens, lengths = prompts
        if not isinstance(lengths, jax.core.Tracer):
            bad = np.flatnonzero((np.asarray(lengths) < 1) | (np.asarray(lengths) > tokens.shape[1]))
            if bad.size:
                raise DataError(f"prompt {bad[0]} has length {np.asarray(lengths)[bad[0]]}; lengths must be in "
                                f"[1, prompt width {tokens.shape[1]}] (empty prompts are not allowed)")
    else:
        tokens, lengths = pad_prompts(prompts, cfg, config)
    jitted = generate_jit(jax.default_backend(), cfg.d_model)
    return jitted(params if prepared is None else prepared, cfg, jnp.asarray(tokens, jnp.int32),
                  jnp.asarray(lengths, jnp.int32), key, config)
