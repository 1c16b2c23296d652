"""The report computes first and renders second: markdown.py, plots.py and wandb_report.py take
from the modules that compute (stats, policy, compute, analysis) only constants and the types of
computed results (classes without methods), never a function or a module to call into."""
import ast
from pathlib import Path

REPORT = Path(__file__).parent.parent / "vitprune" / "report"
COMPUTING = ("stats", "policy", "compute", "analysis")
RENDERING = ("markdown", "plots", "wandb_report")


def imports(module: str) -> list:
    """(module, name) of every import of vitprune/report/MODULE.py, inside functions too; name is
    None for `import module`; a relative module is made absolute."""
    found = []
    for node in ast.walk(ast.parse((REPORT / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["vitprune", "report"][:3 - node.level] + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def describes(module: str, name: str) -> bool:
    """Whether `name` is bound at the top of vitprune/report/MODULE.py by an assignment (a constant,
    a namedtuple) or by a class whose body defines no function."""
    for node in ast.parse((REPORT / f"{module}.py").read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def computing_imports(module: str) -> list:
    """The imports of a module that reach into the computing modules for more than a description."""
    bad = []
    for base, name in imports(module):
        if base in {f"vitprune.report.{m}" for m in COMPUTING}:
            if name is None or not describes(base.rpartition(".")[2], name):
                bad.append(f"{base}.{name}" if name else base)
        elif base == "vitprune.report" and name in COMPUTING:
            bad.append(f"{base}.{name}")
    return bad


def test_the_rule_tells_results_from_computations():
    assert describes("stats", "Summary") and describes("stats", "Paired") and describes("stats", "RISING")
    assert describes("analysis", "CellTables") and describes("policy", "POLICY")
    assert not describes("stats", "run_stats") and not describes("stats", "mean")
    assert not describes("policy", "Verdicts") and not describes("policy", "Cell")  # classes that compute
    assert ("vitprune.report.stats", "Summary") in imports("markdown")


def test_renderers_receive_numbers():
    for module in RENDERING:
        assert not computing_imports(module), (module, computing_imports(module))
