"""Document sources. The built-in corpus is the running interpreter's standard library: its `.py` sources
(tests excluded) and the pydoc topic texts — real code and prose that ship with every Python, no download."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

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
