"""kernels/dispatch.py is the one place that chooses kernels, and docs/attention.md tells its table."""

from __future__ import annotations

import inspect
from pathlib import Path

from jaxllm.kernels import dispatch

DOC = Path(__file__).resolve().parents[1] / "docs" / "attention.md"


def test_docs_carry_the_dispatch_table():
    assert dispatch.table_markdown() in DOC.read_text(), "regenerate docs/attention.md's table from dispatch.TABLE"


def test_table_names_every_choice():
    """Every public deciding function of dispatch.py appears in the table's `when` column."""
    deciders = [name for name, fn in inspect.getmembers(dispatch, inspect.isfunction)
                if fn.__module__ == dispatch.__name__ and name.endswith(("_takes", "resolve_impl", "say_flash_variants",
                                                                         "cublas_for_decode"))]
    when = " ".join(row[1] for row in dispatch.TABLE)
    assert len(deciders) >= 7 and all(f"`{name}`" in when for name in deciders), deciders


def test_decode_kernels_follow_impl_and_backend(monkeypatch):
    assert not dispatch.decode_kernels_enabled("auto")  # the CPU: auto means xla
    assert dispatch.decode_kernels_enabled("pallas")  # interpret mode, for tests
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    assert dispatch.decode_kernels_enabled("auto") and not dispatch.decode_kernels_enabled("xla")
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")
    assert not dispatch.decode_kernels_enabled("pallas")
    assert dispatch.cublas_for_decode("gpu", dispatch.CUBLAS_MIN_D_MODEL)
    assert not dispatch.cublas_for_decode("gpu", 768) and not dispatch.cublas_for_decode("cpu", 4096)
    assert dispatch.top_k_takes("pallas", 512, 8, 1.0) is False  # TPU: no decode kernels
