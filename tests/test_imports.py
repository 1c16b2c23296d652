"""No import cycle inside vitprune/ and kernels/ (installed as vitprune.kernels): every import
counts, those inside functions too, since a cycle held together by a late import is still one."""
import ast
import os
from pathlib import Path

REPO = Path(__file__).parent.parent
ROOTS = {"vitprune": REPO / "vitprune", "vitprune.kernels": REPO / "kernels"}


def modules() -> dict:
    """{dotted name: path} of every module; kernels/X.py is vitprune.kernels.X."""
    found = {}
    for package, root in ROOTS.items():
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            prefix = ".".join([package, *Path(folder).relative_to(root).parts])
            for file in files:
                if file.endswith(".py"):
                    name = prefix if file == "__init__.py" else f"{prefix}.{file[:-3]}"
                    found[name] = Path(folder) / file
    return found


def imported(name: str, path: Path, known) -> set:
    """The modules among `known` that module `name` imports: `from pkg import x` reaches pkg.x
    when that is a module, else pkg; a package is not reached through its submodules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in edges if m in known and m != name}


def cycles(graph: dict) -> list:
    """Per strongly connected set of modules (Tarjan): its modules and one cycle through them."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append((sorted(component), _cycle_through(min(component), graph, component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_through(start: str, graph: dict, component: set) -> list:
    """A shortest path start -> ... -> start inside the component (breadth first)."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & component):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"{start} is in no cycle")


def import_graph() -> dict:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "vitprune.kernels.self_check" in graph["vitprune.kernels"]  # `from .self_check import` in a function
    assert "vitprune.kernels.reference" in graph["vitprune.kernels"]  # `from . import reference`
    assert "vitprune.deploy" in graph["vitprune"]  # the lazy load_exported
    assert "vitprune.train" in graph["vitprune.__main__"]
    assert "vitprune.model" in graph["vitprune.kernels.aot"]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(
        f"{', '.join(members)}: {' -> '.join(cycle)}" for members, cycle in found)


# A module a reader can hold in mind; the loop readable in one sitting (train.py).
MAX_LINES, MAX_LOOP_LINES = 450, 400


def test_modules_stay_small():
    sizes = {path: len(path.read_text().splitlines()) for path in modules().values()}
    too_big = {str(p.relative_to(REPO)): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_big, f"modules over {MAX_LINES} lines (split them by concept): {too_big}"
    loop = sizes[REPO / "vitprune" / "train.py"]
    assert loop <= MAX_LOOP_LINES, f"vitprune/train.py has {loop} lines; the loop stays at {MAX_LOOP_LINES} or fewer"
