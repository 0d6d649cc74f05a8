"""The project's import rule, checked on the source (every import, lazy ones inside functions
too): kernels <- core <- {PEFT tuner <- trainer, vLLM plugin, serve CLI} <- bench, and no import
circle.

Core is the ``moka_core`` package (torch and safetensors at import; no vLLM, no transformers).
A new module must be placed in :func:`layer`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moka_core", "moka_kernels", "moka_peft", "moka_serve", "moka_trainer")
# What each layer may import besides itself. The trainer, the plugin and the serve CLI stand
# side by side: none of them imports another.
ALLOWED = {
    "kernels": {"kernels"},
    "core": {"kernels", "core"},
    "tuner": {"kernels", "core", "tuner"},
    "trainer": {"kernels", "core", "tuner", "trainer"},
    "plugin": {"kernels", "core", "plugin"},
    "cli": {"kernels", "core", "cli"},
    "bench": {"kernels", "core", "tuner", "trainer", "plugin", "cli", "bench"},
}


def layer(module: str) -> str:
    if module.startswith("moka_kernels"):
        return "kernels"
    if module.startswith("moka_peft"):
        return "tuner"
    if module.startswith("moka_trainer"):
        return "trainer"
    if module.startswith("moka_serve.plugin"):
        return "plugin"
    if module.startswith("moka_serve.bench"):
        return "bench"
    if module == "moka_serve.cli":
        return "cli"
    if module.startswith("moka_core") or module == "moka_serve":  # the latter: an empty __init__
        return "core"
    raise AssertionError(f"{module}: place it in a layer (tests/test_layering.py)")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_every_import_points_down_the_layers(graph):
    wrong = [
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if layer(t) not in ALLOWED[layer(m)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle(graph):
    """Lazy imports count: a circle of them is still two modules that need each other."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # A package's __init__ importing its own modules, which import the package back for a
    # shared name, is Python's normal package shape: only circles between modules count.
    circles = [c for c in circles if not any(p in PACKAGES for p in c.split(" -> "))]
    assert not circles, "\n".join(circles)


def test_the_rule_sees_a_wrong_import(tmp_path):
    """The walker finds lazy and relative imports (what the two tests above rely on)."""
    src = tmp_path / "cli.py"
    src.write_text("def f():\n    from .bench import soak\n    import moka_trainer.train\n")
    known = {"moka_serve.bench", "moka_serve.bench.soak", "moka_trainer.train"}
    found = imports("moka_serve.cli", src, known)
    assert found == {"moka_serve.bench", "moka_serve.bench.soak", "moka_trainer.train"}
    assert layer("moka_serve.bench.soak") not in ALLOWED[layer("moka_serve.cli")]


def test_core_imports_with_torch_and_safetensors_alone():
    """Every core module imports without vLLM, transformers, PEFT, TRL or bitsandbytes (they
    are imported inside the functions that need them)."""
    import subprocess
    import sys

    names = sorted(m for m in modules() if layer(m) == "core" and m.startswith("moka_core"))
    assert len(names) > 10
    code = (
        "import importlib, sys\n"
        f"for m in {names!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('vllm', 'transformers', 'peft', 'trl', 'bitsandbytes') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
