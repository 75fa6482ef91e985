"""House rules checked on the source: short functions, and imports at the top of modules.

The import layering itself is checked by import-linter (`lint-imports`, contracts in pyproject.toml),
and style by ruff; both run in .ci/run before the tests.
"""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "titans")
MAX_FUNCTION_LINES = 80


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    source = f.read()
                yield os.path.relpath(path, REPO), source, ast.parse(source)


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for path, _, tree in _modules()
        for fn in _functions(tree)
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions longer than 80 lines:\n" + "\n".join(long)


def test_titans_imports_inside_functions_are_deferred_on_purpose():
    """A `titans` import inside a function is allowed only to defer a heavy optional dependency
    (ray, tensorflow), and says so on its line: `# noqa: PLC0415  (deferred: <reason>)`."""
    bad = []
    for path, source, tree in _modules():
        lines = source.splitlines()
        for fn in _functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if (
                        any(n == "titans" or n.startswith("titans.") for n in names)
                        and "(deferred:" not in lines[node.lineno - 1]
                    ):
                        bad.append(f"{path}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "function-level titans imports without a reason:\n" + "\n".join(bad)


def test_the_checks_above_can_fail():
    """The two checks read what they claim to read (a guard against a walker that finds nothing)."""
    tree = ast.parse("def f():\n" + "    x = 1\n" * 90 + "    from titans import data\n")
    fn = next(_functions(tree))
    assert fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    assert any(isinstance(n, ast.ImportFrom) and n.module == "titans" for n in ast.walk(fn))
    assert sum(1 for _ in _modules()) > 50


def test_a_training_command_imports_no_plotting_sklearn_or_torch():
    """Start-up time: `titans.main` must not pull in matplotlib, scikit-learn (with scipy) or PyTorch
    (tensorboardX did): 2-4 s of every training run on this project's machines. They load on first use."""
    heavy = ("matplotlib", "sklearn", "scipy", "torch", "tensorboardX")
    code = f"import sys, titans.main; print([m for m in {heavy!r} if m in sys.modules])"
    env = {**os.environ, "TITANS_HOST_MALLOC": "default"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env=env)
    assert out.stdout.strip() == "[]", out.stdout
