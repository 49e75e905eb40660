"""golem's packages stay readable: no module over 600 lines and no function over 80 in io/,
runtime/ and predictors/ (every subpackage included), each offender named with its file,
line and length. Data tables belong at module level, where they are no function's lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("io", "runtime", "predictors")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def too_long(source: str, name: str) -> list[str]:
    """The module ``name`` if over ``MAX_MODULE_LINES`` and each function (methods and nested
    ones included) over ``MAX_FUNCTION_LINES``, as 'name: N lines' / 'name:LINE function: N lines'."""
    found = []
    num_lines = len(source.splitlines())
    if num_lines > MAX_MODULE_LINES:
        found.append(f"{name}: {num_lines} lines (at most {MAX_MODULE_LINES})")
    functions = sorted((node.lineno, node.end_lineno - node.lineno + 1, node.name)  # decorators aside
                       for node in ast.walk(ast.parse(source, name))
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    found += [f"{name}:{line} {function}: {lines} lines (at most {MAX_FUNCTION_LINES})"
              for line, lines, function in functions if lines > MAX_FUNCTION_LINES]
    return found


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_600_lines_and_no_function_over_80():
    paths = modules()
    assert len(paths) > 50 and {p.relative_to(ROOT).parts[0] for p in paths} == set(PACKAGES)
    found = [line for p in paths for line in too_long(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "too long:\n" + "\n".join(found)


def _function(name: str, num_lines: int, indent: str = "") -> str:
    return f"{indent}def {name}():\n" + "".join(f"{indent}    x{i} = {i}\n" for i in range(num_lines - 1))


def test_the_check_names_a_long_function_a_long_method_and_a_long_module():
    source = (_function("short", 80)  # the limit: allowed
              + "\nclass C:\n" + _function("method", 81, "    ")
              + "\n" + _function("long", 81).replace("def", "async def", 1))
    assert too_long(source, "m.py") == ["m.py:83 method: 81 lines (at most 80)",
                                        "m.py:165 long: 81 lines (at most 80)"]
    table = "TABLE = {\n" + "".join(f"    {i}: {i},\n" for i in range(599)) + "}\n"  # 601 lines
    assert too_long(table, "t.py") == ["t.py: 601 lines (at most 600)"]
    assert too_long(table[:table.index("    598")] + "}\n", "t.py") == []
