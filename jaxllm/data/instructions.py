"""Built-in instruction and preference sets made from the Python standard library, with no download.

Sources are parsed with `ast` (nothing is imported, so no side effects): for each public top-level function
with a docstring, the instruction is "Summarise what `module.func(signature)` does." and the response is the
docstring's first line. The held-out split is by module (the same crc32 rule as the pre-training corpus), so
no held-out module's functions are seen in training. The preference set pairs each instruction's right line
(chosen) with a near miss (rejected): the first line of the next function of the same module, or of the
nearest module when the module has one function.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np
from scipy import optimize

from jaxllm.data import sources, tokenizer as tokenizers
from jaxllm.data.pipeline import fingerprint

MIN_LINE_CHARS = 12


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _functions(tree: ast.Module, methods: bool = False) -> list[tuple[str, str, str]]:
    """(name, signature, first docstring line) of public top-level functions with a useful docstring;
    with methods=True also public methods of public top-level classes, named Class.method (self/cls dropped)."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = []  # (name, def node, is a method), in source order
    for node in tree.body:
        if isinstance(node, defs):
            nodes.append((node.name, node, False))
        elif methods and isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            nodes += [(f"{node.name}.{m.name}", m, True) for m in node.body if isinstance(m, defs)]
    out = []
    for name, node, is_method in nodes:
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if len(line) < MIN_LINE_CHARS:
            continue
        args = node.args
        if is_method and args.args and args.args[0].arg in ("self", "cls"):
            args = ast.arguments(posonlyargs=args.posonlyargs, args=args.args[1:], vararg=args.vararg,
                                 kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults, kwarg=args.kwarg,
                                 defaults=args.defaults)
        out.append((name, ast.unparse(args), line))
    return out


def stdlib_functions(max_modules: int = 0, methods: bool = False) -> list[dict]:
    """[{module, function, signature, summary}] in a fixed order (sorted files, then source order); with
    methods=True also methods of public classes (function "Class.method", signature without self/cls).

    Cached as JSON in the jaxllm cache directory (per Python version), since parsing takes seconds."""
    key = fingerprint({"v": 2, "python": sys.version, "max_modules": max_modules, "methods": methods})
    path = tokenizers.cache_dir() / f"stdlib-functions-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = _parse_stdlib(max_modules, methods)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out


def _parse_stdlib(max_modules: int, methods: bool) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, modules = [], 0
    for path in sources._stdlib_files():
        if max_modules and modules >= max_modules:
            break
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        module = _module_name(path.relative_to(root))
        found = _functions(tree, methods)
        if found:
            modules += 1
        for name, sig, line in found:
            out.append({"module": module, "function": name, "signature": sig, "summary": line})
    return out


def instruction(fn: dict) -> str:
    return f"Summarise what `{fn['module']}.{fn['function']}({fn['signature']})` does."


def sft_records(heldout_fraction: float, max_modules: int = 0) -> tuple[list, list]:
    """(train, held-out) lists of (where, record) with Alpaca-style records."""
    train, held = [], []
    for fn in stdlib_functions(max_modules):
        rec = {"instruction": instruction(fn), "input": "", "output": fn["summary"]}
        where = f"builtin:{fn['module']}.{fn['function']}"
        (held if sources.is_heldout(fn["module"], heldout_fraction) else train).append((where, rec))
    return train, held


def preference_records(heldout_fraction: float, max_modules: int = 0, rounds: int = 1,
                       methods: bool = False) -> tuple[list, list]:
    """(train, held-out) lists of (where, {"prompt", "chosen", "rejected"}), deterministic.

    Each function gets up to `rounds` pairs, each with a different near miss (see near_misses); functions of
    modules with a single function get none. methods=True adds the methods of public classes (about 3.5 times
    as many pairs; near misses still come from the whole module)."""
    fns = stdlib_functions(max_modules, methods)
    by_module: dict[str, list[int]] = {}
    for i, fn in enumerate(fns):
        by_module.setdefault(fn["module"], []).append(i)
    misses: dict[int, list[int]] = {}
    for same_module in by_module.values():
        used: set[tuple[int, int]] = set()
        for _ in range(rounds):
            found = near_misses(fns, same_module, used)
            used.update(found.items())
            for i, j in found.items():
                misses.setdefault(i, []).append(j)
    train, held = [], []
    for i, fn in enumerate(fns):
        for j in misses.get(i, []):
            rec = {"prompt": instruction(fn), "chosen": fn["summary"], "rejected": fns[j]["summary"]}
            where = f"builtin:{fn['module']}.{fn['function']}"
            (held if sources.is_heldout(fn["module"], heldout_fraction) else train).append((where, rec))
    return train, held


def name_overlap(fn: dict, line: str) -> int:
    """How many distinct words (3+ letters) of `line` occur inside fn's name or signature (lower case)."""
    key = f"{fn['function']} {fn['signature']}".lower()
    return sum(1 for w in set(re.findall(r"[a-z]{3,}", line.lower())) if w in key)


def near_misses(fns: list[dict], same_module: list[int], used: set = frozenset()) -> dict[int, int]:
    """{i: j}: function i of a module gets the line of function j != i of the same module as its near miss.

    A permutation (each line is rejected exactly once, as it is chosen once, so a line alone says nothing
    about the label) that minimises how many of the rejected line's words occur in i's name and signature,
    ties broken by the nearest next function in source order. So the right line is the one that fits the
    named function, and the rejected one is still a real docstring of the same module. Pairs (i, j) in
    `used`, and lines equal to i's own, are never chosen; when no full permutation avoids them, the functions
    left without one get no near miss."""
    n = len(same_module)
    if n < 2:
        return {}
    big = 1e9
    cost = np.full((n, n), big)
    for p, i in enumerate(same_module):
        for q, j in enumerate(same_module):
            if p != q and fns[i]["summary"] != fns[j]["summary"] and (i, j) not in used:
                cost[p, q] = name_overlap(fns[i], fns[j]["summary"]) * n + (q - p) % n
    rows, cols = optimize.linear_sum_assignment(cost)
    return {same_module[p]: same_module[q] for p, q in zip(rows, cols) if cost[p, q] < big}
