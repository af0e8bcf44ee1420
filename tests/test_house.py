"""The house rules that can be checked mechanically: imports follow the data flow, files keep to their budget, and
importing the package creates no MLX state and registers nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The data flow, earliest first: a module may import only modules before it (or itself, for packages).
ORDER = [
    "config", "dtypes", "backend", "fileio", "tensorfile", "sample", "chart", "linear", "cpu_kernels", "cache", "model",
    "llama_vocab", "tokenizer", "tokenizer_json", "tokenizer_fetch", "convert", "load", "random_weights", "decode",
    "runner", "speculative", "hub", "generate", "batch", "chat", "chat_terminal", "device", "bench", "sweep",
    "jobs", "evaluate", "server", "cli",
]
MAX_LINES = 500  # twice the largest budget in STYLE.md; a longer file says why in its first docstring lines


def _modules() -> dict[str, Path]:
    files = {p: p for p in [*(REPO / "mlx_openelm").rglob("*.py"), *(REPO / "convert").glob("*.py"), REPO / "cli.py"]}
    return {str(p.relative_to(REPO)): p for p in files}


def _group(path: Path) -> str:
    rel = path.relative_to(REPO).parts
    if rel[0] == "convert":
        return "convert"
    if rel[0] == "cli.py":
        return "cli"
    return rel[1].removesuffix(".py") if rel[1] != "__init__.py" else "__init__"


def _imports(path: Path) -> set[str]:
    """First-level package modules ``path`` imports, anywhere in the file (lazy imports count too)."""
    found = set()
    package = path.relative_to(REPO).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = list(package[: len(package) - node.level + 1]) if node.level > 1 else list(package)
                parts = [*base, *(node.module or "").split(".")] if node.module else base
                names = [".".join(parts)] + [".".join([*parts, a.name]) for a in node.names]
            else:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "convert":  # the converter's own package, seen from inside it
                parts = ["mlx_openelm", "convert", *parts[1:]]
            if parts[0] == "mlx_openelm" and len(parts) > 1 and parts[1] in ORDER:
                found.add(parts[1])
    return found


def test_no_module_imports_one_later_in_the_data_flow():
    backwards = []
    for rel, path in _modules().items():
        group = _group(path)
        if group == "__init__":
            continue
        for target in _imports(path):
            if target != group and ORDER.index(target) > ORDER.index(group):
                backwards.append(f"{rel} ({group}) imports {target}")
    assert backwards == []


def test_every_module_is_placed_in_the_flow():
    groups = {_group(p) for p in _modules().values()} - {"__init__"}
    assert groups <= set(ORDER), groups - set(ORDER)


def test_files_keep_to_their_budget_or_say_why():
    long = []
    for rel, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and "budget" not in "\n".join(lines[:6]):
            long.append(f"{rel}: {len(lines)} lines")
    assert long == []


def test_importing_the_package_creates_no_mlx_state():
    # A stream made after the imports gets the same index as in a process that imported nothing of ours: the
    # imports made no stream. And the detokenizer's codec error handler is registered on first use only.
    probe = "import mlx.core as mx\n{imports}\nprint(mx.new_stream(mx.cpu))\n"
    imports = ("import codecs, cli, mlx_openelm, mlx_openelm.server.app, mlx_openelm.jobs.perplexity, "
               "mlx_openelm.jobs.batch_generate, mlx_openelm.bench, mlx_openelm.sweep, mlx_openelm.chat_terminal\n"
               "try:\n    codecs.lookup_error('mlx_openelm.spm_replace')\n    print('registered')\n"
               "except LookupError:\n    pass")
    bare, ours = (subprocess.run([sys.executable, "-c", probe.format(imports=i)], capture_output=True, text=True,
                                 cwd=REPO, timeout=120, check=True).stdout for i in ("", imports))
    assert ours == bare and "registered" not in ours
