"""Benchmark KV-cache generation: new tokens/s of `jaxllm.generate.sampling.generate` against Hugging Face
`LlamaForCausalLM.generate()` (randomly initialised, same shape, bf16) on the same card in the same run.

  python scripts/bench_generate.py                      # 124m and 1b, batch 64, prompt 128, 128 new tokens
  python scripts/bench_generate.py --configs 1b --rounds 3 --no-diagnostics   # ours and HF alternately, 3 times
  python scripts/bench_generate.py --tiny               # CPU smoke run (HF part skipped if torch is missing)

Prints one JSON line per measurement and a table at the end (with --rounds, each round's speed-up: the peer's
speed varies between runs and machines more than ours does). Protocol (shared BENCHMARKS.md): two warm-up
calls, then the median of --reps calls, each ended with a device sync; random prompts; ours is checked
against a full forward pass (no cache) before timing. Both sides sample with the same temperature / top-k /
top-p, with no stop token, so every row produces exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for the torch peer

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm import config as config_lib, models  # noqa: E402
from jaxllm.generate import sampling  # noqa: E402
from jaxllm.models import transformer  # noqa: E402

# The model shapes of shared BENCHMARKS.md (configs/124m.yaml, configs/1b.yaml).
SHAPES = {
    "124m": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
                 max_seq_len=1024, tie_embeddings=False),
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, d_ff=5632,
               max_seq_len=2048, tie_embeddings=False),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
                 tie_embeddings=False),
}


def model_config(name: str) -> config_lib.ModelConfig:
    return config_lib.ModelConfig(**SHAPES[name], dtype="bfloat16")


def init_params(cfg: config_lib.ModelConfig):
    """Random float32 params created on the device by one jitted init (no host round trip)."""
    graphdef, _ = models.abstract(cfg)
    params = jax.jit(lambda: models.split(models.build(cfg, rngs=nnx.Rngs(0)))[1])()
    return graphdef, params


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps calls after two warm-ups; fn must block until its result is ready."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_against_full_forward(graphdef, params, cfg, prompts: np.ndarray, config) -> dict:
    """Greedy-decode 2 rows, then score the same tokens with the full forward pass (no cache)."""
    greedy = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    tokens, logprobs, _ = sampling.generate(graphdef, params, [list(r) for r in prompts[:2]], jax.random.key(0),
                                            greedy)
    seq = jnp.concatenate([jnp.asarray(prompts[:2]), tokens], axis=1)  # [2, P + 8]
    positions = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape)
    logits = jax.jit(transformer.logits, static_argnums=1)(params, cfg, seq, positions, jnp.ones_like(seq))
    logits = logits[:, prompts.shape[1] - 1:-1]  # [2, 8, V]: the ones that predicted the new tokens
    full = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
    return {"check_max_logprob_diff": float(jnp.max(jnp.abs(full - logprobs))),
            "check_greedy_agreement": float(jnp.mean(jnp.argmax(logits, -1) == tokens))}


def bench_ours(name: str, args) -> tuple[dict, Callable[[], float]]:
    """Our record (check, median seconds per call, diagnostics) and a function that times the call again."""
    cfg = model_config(name)
    graphdef, params = init_params(cfg)
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    config = sampling.SamplingConfig(max_new_tokens=args.new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, prompt_bucket=args.prompt_len)
    record = check_against_full_forward(graphdef, params, cfg, prompts, config)
    lengths = jnp.full((args.batch,), args.prompt_len, jnp.int32)
    batch = (jnp.asarray(prompts), lengths)

    # Params cast to bf16 and fused once, as the CLI does and as the peer's bf16 model is loaded once.
    prepared = jax.block_until_ready(sampling.prepare(params, cfg))

    def run(cfg_: sampling.SamplingConfig, prep=prepared):
        def call():
            out = sampling.generate(graphdef, params, batch, jax.random.key(1), cfg_, prepared=prep)
            jax.block_until_ready(out)
            assert int(out[2].sum()) == args.batch * cfg_.max_new_tokens
        return call

    seconds = timed(run(config), args.reps)
    record.update(impl="jaxllm", median_s=seconds, card=jax.devices()[0].device_kind, jax=jax.__version__,
                  jaxlib=jaxlib.__version__)
    if not args.no_diagnostics:
        # The float32 params prepared inside every call (as in a PPO rollout), the same call greedy (sampling
        # cost), and with 1 new token (prefill + one step): three more compilations.
        one_s = timed(run(dataclasses.replace(config, max_new_tokens=1)), args.reps)
        record.update(unprepared_median_s=timed(run(config, None), args.reps),
                      greedy_median_s=timed(run(dataclasses.replace(config, temperature=0.0)), args.reps),
                      prefill_plus_1_s=one_s, decode_step_ms=1e3 * (seconds - one_s) / max(args.new_tokens - 1, 1))
    return record, lambda: timed(run(config), args.reps)


def measure(name: str, args) -> Iterator[dict]:
    """Ours and the peer alternately, --rounds times (the peer's speed varies from run to run); ours is compiled
    and checked once. Yields one record per measurement, with its round, as soon as it is taken (a run cut off
    by a time limit keeps what it measured)."""
    ours, again = bench_ours(name, args)
    same = {k: ours[k] for k in ("impl", "card", "jax", "jaxlib")}  # the check and diagnostics: round 0 only
    for i in range(args.rounds):
        yield {**ours, "round": 0} if i == 0 else {**same, "round": i, "median_s": again()}
        hf = None if args.no_hf else bench_hf_subprocess(name, args)
        if hf:
            yield {**hf, "round": i}


def bench_hf(name: str, args) -> dict | None:
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"# hf {name}: skipped ({e})", flush=True)
        return None
    shape = SHAPES[name]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=shape["max_seq_len"],
        tie_word_embeddings=shape["tie_embeddings"], rms_norm_eps=1e-5,  # rope theta: 10000 on both sides
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.bfloat16).eval()
    prompts = torch.randint(2, shape["vocab_size"], (args.batch, args.prompt_len), device=device)
    mask = torch.ones_like(prompts)

    def run():
        with torch.inference_mode():
            sampling_args = (dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
                             if args.temperature > 0 else dict(do_sample=False))
            out = model.generate(prompts, attention_mask=mask, **sampling_args, max_new_tokens=args.new_tokens,
                                 pad_token_id=0)  # no eos: every row runs to max_new_tokens
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape

    seconds = timed(run, args.reps)
    record = {"impl": "hf", "median_s": seconds, "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__}
    if device == "cuda":
        record["kernel_s"] = profiled_kernel_seconds(run)
        del model
        torch.cuda.empty_cache()
    return record


def profiled_kernel_seconds(run: Callable[[], None]) -> float:
    """The peer's GPU time in one call of run(): the summed durations of its kernels, copies and fills in a
    torch.profiler trace. Against the call's wall time it says whether the card or the host sets the peer's speed."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
        prof.export_chrome_trace(path)
        return trace_gpu_seconds(path)


def trace_gpu_seconds(path: str) -> float:
    """Seconds of GPU work in a Chrome trace (torch.profiler's export): the 'dur' (us) of its complete events in
    the kernel, gpu_memcpy and gpu_memset categories."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    gpu = {"kernel", "gpu_memcpy", "gpu_memset"}
    return 1e-6 * sum(e.get("dur", 0) for e in events if e.get("ph") == "X" and e.get("cat") in gpu)


def host_cpu() -> str:
    """The host's CPU model and core count: the peer's Python-side overhead depends on them."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    return f"{model} x {os.cpu_count()}"


def bench_hf_subprocess(name: str, args) -> dict | None:
    """bench_hf in a child process: torch and jax keep their own CUDA libraries and memory pools apart."""
    cmd = [sys.executable, os.path.abspath(__file__), "--hf-worker", "--configs", name, "--batch", str(args.batch),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--temperature",
           str(args.temperature), "--top-k", str(args.top_k), "--top-p", str(args.top_p), "--reps", str(args.reps)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            print(line, flush=True)
    if result.returncode == 0 and not lines:  # skipped; the child said why
        return None
    if result.returncode or not lines:
        print(f"# hf {name}: failed (exit {result.returncode}): {result.stderr.strip()[-1500:]}", flush=True)
        return None
    return json.loads(lines[-1])


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="124m,1b", help="comma-separated: 124m, 1b, tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50, help="Hugging Face's default for sampling")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure ours and the peer alternately this many times (the peer varies run to run)")
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip the greedy / prefill+1 / unprepared timings (three compilations per config)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peer")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, batch 4, 16 + 16 tokens")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)  # the child of bench_hf_subprocess
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1")
    if args.tiny:
        args.configs, args.batch, args.prompt_len, args.new_tokens, args.reps = "tiny", 4, 16, 16, 3
    return args


def _report(rows: list[dict]) -> None:
    """The table: per config and impl, the median new tokens/s over the rounds; the speed-up of each round, and
    of ours (median) over the peer's fastest round (the conservative ratio: the peer's speed varies most); for
    the peer, the share of each round's call that its GPU was busy."""
    print("\n| config | impl | card | new tokens/s (median of rounds) | speed-up vs HF, per round | vs HF's fastest "
          "round | ours: greedy s/call, prefill+1 s, decode ms/step, s/call preparing params per call | "
          "HF: GPU busy per round |\n|---|---|---|---|---|---|---|---|")
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        peer = {r["round"]: r["new_tokens_per_s"] for r in mine if r["impl"] == "hf"}
        for impl in dict.fromkeys(r["impl"] for r in mine):
            runs = [r for r in mine if r["impl"] == impl]
            ratios = [r["new_tokens_per_s"] / peer[r["round"]] for r in runs if impl != "hf" and r["round"] in peer]
            median = statistics.median(r["new_tokens_per_s"] for r in runs)
            worst = f"{median / max(peer.values()):.1f}x" if impl != "hf" and peer else "-"
            first = runs[0]
            extra = (f"{first['greedy_median_s']:.3f}, {first['prefill_plus_1_s']:.3f}, "
                     f"{first['decode_step_ms']:.2f}, {first['unprepared_median_s']:.3f}"
                     if "greedy_median_s" in first else "-")
            busy = ", ".join(f"{r['kernel_s'] / r['median_s']:.0%}" for r in runs if "kernel_s" in r) or "-"
            print(f"| {config} | {impl} | {first['card']} | {median:,.0f} | "
                  f"{', '.join(f'{x:.1f}x' for x in ratios) or '-'} | {worst} | {extra} | {busy} |")


def main() -> None:
    args = _args()
    if args.hf_worker:
        result = bench_hf(args.configs, args)
        if result:
            print(json.dumps(result), flush=True)
        return
    common = {"bench": "generate", "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
              "date": datetime.date.today().isoformat(), "host_cpu": host_cpu()}
    rows = []
    for name in args.configs.split(","):
        for result in measure(name, args):
            record = {**common, "config": name, **result,
                      "new_tokens_per_s": args.batch * args.new_tokens / result["median_s"]}
            rows.append(record)
            line = json.dumps(record)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    _report(rows)


if __name__ == "__main__":
    main()
