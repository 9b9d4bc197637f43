"""The shape issue 16 asks of dogkit/core: no function over about 60 lines, no class over about 150."""
import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "dogkit" / "core"
MAX_FUNCTION, MAX_CLASS = 60, 150


def sizes():
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield path.relative_to(CORE.parent.parent), node, node.end_lineno - node.lineno + 1


def test_the_walk_sees_the_trainer():
    assert any(node.name == "Trainer" for _, node, _ in sizes())


def test_no_function_or_class_in_core_is_too_long():
    too_long = [f"{path}:{node.lineno} {node.name} ({n} lines)" for path, node, n in sizes()
                if n > (MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION)]
    assert not too_long, "split these: " + "; ".join(too_long)
