"""The package's import arrows point one way: each layer imports only layers below it (function-level imports
included), and no two modules import each other, directly or round a longer cycle."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "overspill"

# bottom to top; a name is a top-level module (errors.py) or package (runtime/)
LAYERS = [
    {"errors"},
    {"config"},
    {"io", "tokenizer", "kernels"},
    {"families", "quant"},
    {"model"},
    {"checkpoint"},
    {"placement"},
    {"runtime"},
    {"generate"},
    {"finetune", "parallel"},
    {"api", "evaluate"},
    {"serve"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every overspill module this file imports, at any depth of the file (absolute names)."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "overspill"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "overspill":
                continue
            # "from . import quant" names a module; "from .x import y" names module x
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in names if _exists(n)} or {target}
    return out - {mod}


def _exists(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _component(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


FILES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)
GRAPH = {_module_name(p): _imports(p) for p in FILES}


def test_every_component_has_a_layer():
    assert {_component(m) for m in GRAPH} <= set(RANK), {_component(m) for m in GRAPH} - set(RANK)


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_point_down(mod):
    me = _component(mod)
    up = sorted(t for t in GRAPH[mod] if _component(t) != me and RANK[_component(t)] >= RANK[me])
    assert not up, f"{mod} (layer {RANK[me]}: {me}) imports {up}, which are not below it"


def test_no_import_cycles():
    """Module-level graph (a package's __init__ counts as the package)."""
    norm = lambda m: m if m in GRAPH else m.rpartition(".")[0]
    edges = {m: {norm(t) for t in ts if norm(t) in GRAPH and norm(t) != m} for m, ts in GRAPH.items()}
    # a package __init__ that re-exports its own submodules is how a package presents itself, not a cycle
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and m != "overspill")} for m, ts in edges.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
