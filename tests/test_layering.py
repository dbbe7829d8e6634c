"""Dependencies run one way: data -> backbones -> reduction -> training / evaluation -> commands.

Read from the source (every `import`, also those inside functions), so a lazy import
cannot hide a cycle.
"""

import ast
import pathlib

import iared

SRC = pathlib.Path(iared.__file__).parent

# Top-level modules and packages of iared, lowest first; each imports only from layers
# below its own (and from itself).
LAYERS = [
    {"errors", "fileio", "preprocess"},
    {"data"},
    {"backbones"},
    {"integrations", "reduction"},
    {"patch"},
    {"models"},
    {"training", "evaluation"},
    {"commands"},
    {"cli", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports() -> dict[str, set[str]]:
    """Module name (`iared.x.y`) -> the iared modules it imports."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        name = ".".join(["iared", *(parts[:-1] if is_init else parts)])
        modules[name] = (path, is_init)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_init) in modules.items():
        package = name.split(".") if is_init else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            # A module's own package (its __init__) is not a dependency of the module.
            edges[name] |= {c for c in candidates if c in modules and not name.startswith(c + ".") and c != name}
    return edges


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_name_has_a_layer():
    names = {_top(m) for m in _imports()}
    assert names <= set(LAYER), f"give these a layer: {sorted(names - set(LAYER))}"


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} imports {b}" for a, targets in _imports().items() for b in targets
                    if _top(a) != _top(b) and LAYER[_top(b)] >= LAYER[_top(a)])
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    edges = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
