"""Run logging: metrics.jsonl, TensorBoard events and a progress bar."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


def setup(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)  # absl may have set one
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RunLog:
    """Appends metrics to runs/<name>/metrics.jsonl and TensorBoard; owns the progress bar."""

    def __init__(self, run_dir: Path, *, total: int, initial: int, progress: bool, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10)
        self.bar = tqdm(total=total, initial=initial, disable=not progress, dynamic_ncols=True, file=sys.stderr,
                        desc=run_dir.name)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> dict:
        clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"step": step, "split": prefix, "time": time.time(), **clean}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        return clean

    def progress(self, n: int, **postfix) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def say(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]
