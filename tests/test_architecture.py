"""The shape of the package: what `import fbsemlib` pulls in, the import graph (no cycles,
layers only import downwards), module sizes, and one definition of each shared concept."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fbsemlib"

#: sub-package -> layer; a module may import only from its own layer or lower ones
LAYERS = {
    "errors": 0, "config": 0, "provenance": 0, "_version": 0, "outputs": 0,
    "physics": 1, "recon": 2, "models": 3, "data": 4, "training": 5, "evaluation": 6, "cli": 7,
}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """fbsemlib modules imported anywhere in ``path`` (function-level imports included);
    ``from pkg import sub`` counts as an import of the sub-module ``pkg.sub``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fbsemlib"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "fbsemlib":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            if subs:
                out |= set(subs)
            if len(subs) < len(node.names):
                out.add(mod)
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_import_fbsemlib_pulls_in_no_book_or_plotting_machinery():
    code = ("import sys, fbsemlib; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'matplotlib', 'pandas', 'jupytext', 'papermill', 'nbformat', 'fbsembook'}); print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"import fbsemlib imports {r.stdout.strip()}"


def test_the_library_never_imports_the_book():
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "fbsembook" not in text.replace('"fbsembook', "").replace("`fbsembook", ""), path


def test_import_graph_has_no_cycle():
    graph = _graph()
    graph = {m: {d for d in deps if d != "fbsemlib"} for m, deps in graph.items() if m != "fbsemlib"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_import_only_their_own_layer_or_lower_ones():
    bad = []
    for m, deps in _graph().items():
        if m == "fbsemlib":
            continue
        if "fbsemlib" in deps:
            bad.append(f"{m} imports the top-level package (import from the sub-package instead)")
        lm = _layer(m)
        for d in deps:
            ld = _layer(d)
            if lm is not None and ld is not None and ld > lm:
                bad.append(f"{m} (layer {lm}) imports {d} (layer {ld})")
    assert not bad, "\n".join(sorted(bad))


def test_every_module_is_at_most_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    long |= {str(p.relative_to(ROOT)): n for p in (ROOT / "fbsembook").rglob("*.py")
             if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def _definitions(pattern_names: set[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {n: [] for n in pattern_names}
    for path in list(PKG.rglob("*.py")) + list((ROOT / "fbsembook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in found:
                found[node.name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_one_nrmse():
    """The normalised root-mean-square error is defined once (``fbsemlib.evaluation.metrics.nrmse``);
    everything else calls it."""
    defs = _definitions({"nrmse", "_nrmse", "mean_nrmse", "nrmse_curve"})
    assert [len(defs[n]) for n in ("nrmse", "_nrmse", "mean_nrmse")] == [1, 0, 0], defs
    offenders = []
    for path in list(PKG.rglob("*.py")) + list((ROOT / "fbsembook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and "nrmse" in node.name.lower() and node.name != "nrmse":
                body = ast.unparse(node)
                if "sqrt" in body and "nrmse(" not in body.replace(f"def {node.name}(", ""):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not offenders, f"NRMSE computed again instead of calling metrics.nrmse: {offenders}"


def test_one_subset_rule():
    """"Subset m of M is every M-th view starting at m" is written once: a strided slice
    ``[m::M]`` by a number of subsets appears in one function of the package."""
    hits = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Slice) and node.step is not None and not isinstance(node.step, ast.Constant):
                step = ast.unparse(node.step)
                if "subset" in step.lower() or step in ("M", "m_subsets", "n_subsets"):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno} [{ast.unparse(node)}]")
    assert len(hits) == 1, hits


def test_one_projector_cache():
    """Projectors are cached in one place (``fbsemlib.physics.cache``): no other module keeps
    a dict / LRU of projectors or builds a ``Projector`` for a dataset or a loaded model."""
    cache = PKG / "physics" / "cache.py"
    offenders = []
    for path in PKG.rglob("*.py"):
        if path == cache or path.parent.name == "physics":
            continue
        text = path.read_text(encoding="utf-8")
        for i, line in enumerate(text.splitlines(), 1):
            if "Projector(" in line.split("#")[0] and "RingScanner" not in line and "def " not in line \
                    and '"""' not in line and "``" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
            if "_PROJECTORS" in line or "_projectors" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_one_definition_of_the_shared_helpers():
    defs = _definitions({"_is_int", "is_int", "_versions", "versions", "_json_default", "json_default",
                         "UserError", "shared_projector", "em_fusion_step", "fuse", "subset_views"})
    for name in ("_is_int", "_versions", "_json_default"):
        assert not defs[name], (name, defs[name])
    for name in ("is_int", "versions", "json_default", "UserError", "shared_projector", "em_fusion_step", "fuse",
                 "subset_views"):
        assert len(defs[name]) == 1, (name, defs[name])
