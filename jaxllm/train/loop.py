"""The one training loop: data -> step -> log -> eval -> checkpoint, with resume, signals and a NaN guard.

Every stage that trains with `train_step(state, batch)` (pretrain, SFT, reward, DPO) runs through `fit`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxllm import checkpoint, config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.logging import RunLog
from jaxllm.train import state as state_lib
from jaxllm.train.state import TrainState


class TrainingError(JaxllmError, RuntimeError):
    pass


@dataclass(frozen=True)
class Hooks:
    """What a stage plugs into the loop. All optional except the step and the batches."""

    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    batches: Iterator[dict]  # a Grain iterator: get_state() / set_state()
    put_batch: Callable[[dict], dict] = jax.device_put
    evaluate: Callable[[Any], dict] | None = None  # params -> metrics
    sample: Callable[[Any, int], list[dict]] | None = None  # (params, step) -> [{"prompt", "text"}]
    data_fingerprint: str = ""


def prepare_run_dir(run_dir: Path, cfg_dict: dict, *, compare: tuple[str, ...] = ("model",)) -> bool:
    """Create the run directory and its config.yaml; True when resuming an existing run.

    A run directory whose saved config differs in the `compare` sections is refused: resuming it would
    load mismatched weights. The user's files are never overwritten.
    """
    path = run_dir / "config.yaml"
    if path.is_file():
        saved = yaml.safe_load(path.read_text()) or {}
        for section in compare:
            if saved.get(section) != cfg_dict.get(section):
                diff = sorted(k for k in set(saved.get(section, {})) | set(cfg_dict.get(section, {}))
                              if saved.get(section, {}).get(k) != cfg_dict.get(section, {}).get(k))
                raise config_lib.ConfigError(
                    f"{path}: the run was made with other {section}.* settings ({', '.join(diff)}); "
                    "pass the run's own config or choose a new train.name")
        (run_dir / "config.resumed.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    return False


def trim_logs(run_dir: Path, step: int) -> None:
    """Drop metric and sample lines past the checkpoint we resume from, so each step appears once."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in lines))


@contextlib.contextmanager
def _stop_on_signal():
    flag = {"stop": False}
    previous = {}

    def handler(signum, _frame):
        if flag["stop"] and signum == signal.SIGINT:  # a second Ctrl-C: abort now, without the save
            raise KeyboardInterrupt
        flag["stop"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def restore_or_start(mgr, state: TrainState, hooks: Hooks, log: Callable[[str], None]) -> TrainState:
    if mgr.latest_step() is None:
        return state
    # Restore onto the current state's shardings (whatever mesh or device count this run has).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state_lib.as_dict(state))
    restored, data_state, meta = checkpoint.restore(mgr, abstract)
    if hooks.data_fingerprint and meta.get("data_fingerprint") not in (None, hooks.data_fingerprint):
        raise checkpoint.CheckpointError(
            f"{mgr.directory}: the checkpoint was written with another data config (fingerprint "
            f"{meta.get('data_fingerprint')} vs {hooks.data_fingerprint}); resume with the same data.* "
            "settings or start a new train.name")
    if data_state is not None:
        hooks.batches.set_state(data_state)
    log(f"resuming from step {int(restored['step'])} ({mgr.directory})")
    return state_lib.from_dict(restored)


def fit(*, run_dir: Path, state: TrainState, hooks: Hooks, steps: int, ckpt_cfg, train_cfg) -> TrainState:
    """Train until `steps`, resuming from run_dir/checkpoints if present. Returns the final state."""
    mgr = checkpoint.manager(run_dir / "checkpoints", keep=ckpt_cfg.keep, use_async=ckpt_cfg.use_async)
    state = restore_or_start(mgr, state, hooks, print)
    start = int(state.step)
    # Several hosts: process 0 owns run_dir's logs; the others log under run_dir/hosts/<index>.
    log_dir = run_dir if jax.process_index() == 0 else run_dir / "hosts" / str(jax.process_index())
    log_dir.mkdir(parents=True, exist_ok=True)
    trim_logs(log_dir, start)
    runlog = RunLog(log_dir, total=steps, initial=start, progress=train_cfg.progress and jax.process_index() == 0)
    meta = {"data_fingerprint": hooks.data_fingerprint}

    def save(step: int, force: bool = False) -> None:
        state_dict = state_lib.as_dict(state)
        checkpoint.save(mgr, step, state_dict, data_state=hooks.batches.get_state(), meta=meta, force=force)

    pending: list[dict] = []
    last_log, last_step = time.perf_counter(), start

    def flush(step: int, batch_tokens: int) -> None:  # log the pending steps; this is where a NaN is caught
        nonlocal pending, last_log, last_step
        now = time.perf_counter()
        _log_train(runlog, step, pending, tokens_in=batch_tokens * (step - last_step), seconds=now - last_log)
        pending, last_log, last_step = [], now, step

    try:
        with _stop_on_signal() as flag:
            for step in range(start + 1, steps + 1):
                batch = hooks.put_batch(next(hooks.batches))
                state, metrics = hooks.train_step(state, batch)
                pending.append(metrics)
                if step == train_cfg.stop_at:
                    flag["stop"] = True
                runlog.progress(1)
                if step % train_cfg.log_every == 0:
                    flush(step, batch["tokens"].size)
                if hooks.evaluate and (step % train_cfg.eval_every == 0 or step == steps):
                    ev = runlog.write(step, hooks.evaluate(state.params), prefix="eval")
                    runlog.say(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in ev.items()))
                if hooks.sample and ((train_cfg.sample_every and step % train_cfg.sample_every == 0)
                                     or step == steps):
                    _write_samples(log_dir, runlog, step, hooks.sample(state.params, step))
                # A signal may have landed in any blocking call above (the metrics fetch, eval, samples):
                # read the flag once, after them, so that a stop always saves the step it reports.
                stop = flag["stop"]
                if step % ckpt_cfg.every == 0 or step == steps or stop:
                    if pending:  # no checkpoint holds a state whose loss was not checked
                        flush(step, batch["tokens"].size)
                    save(step)
                if stop:
                    runlog.say(f"stopped at step {step}: checkpoint saved; run the same command to resume")
                    break
    finally:
        mgr.wait_until_finished()
        mgr.close()
        runlog.close()
    return state


def _log_train(runlog: RunLog, step: int, pending: list[dict], *, tokens_in: int, seconds: float) -> None:
    host = jax.device_get(pending)  # one host sync per log interval
    metrics = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
    if not math.isfinite(metrics["loss"]):
        raise TrainingError(f"loss became {metrics['loss']} by step {step}; the last checkpoint is kept. "
                            "Lower optim.lr, raise optim.warmup_steps or check the data")
    metrics["tokens_per_s"] = tokens_in / max(seconds, 1e-9)
    runlog.write(step, metrics)
    runlog.progress(0, loss=metrics["loss"], lr=metrics.get("lr", 0.0), tok_s=int(metrics["tokens_per_s"]))


def _write_samples(run_dir: Path, runlog: RunLog, step: int, samples: list[dict]) -> None:
    with (run_dir / "samples.jsonl").open("a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
    for s in samples:
        runlog.say(f"--- sample @ {step}: {s.get('prompt', '')!r}\n{s.get('prompt', '')}{s['text']}")
