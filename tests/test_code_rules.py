"""Code rules the package keeps: modules of one concern (at most 500 lines), and parsed
command-line options (``argparse.Namespace``) only in the command-line layer: library code takes
typed configs or keyword arguments, as SAM's builders and torchtitan's components do."""
from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blsam")
# the command-line layer: the tools, the shared parse / error path and the YAML defaults
CLI_LAYER = ("tools/", "utils/cli.py", "utils/config.py")
MAX_LINES = 500


def _modules() -> list[str]:
    out = []
    for folder, _, files in os.walk(PKG):
        out += [os.path.relpath(os.path.join(folder, f), PKG).replace(os.sep, "/")
                for f in files if f.endswith(".py")]
    return sorted(out)


def _namespace_functions(source: str) -> list[str]:
    """Functions with a parameter or return annotated as a Namespace."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            notes = [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs]
            notes += [node.returns]
            if any(n is not None and "Namespace" in ast.unparse(n) for n in notes):
                found.append(f"{node.name} (line {node.lineno})")
    return found


def test_rule_detects_namespace_functions():
    src = ("import argparse\ndef f(args: argparse.Namespace) -> None: ...\n"
           "def g(x: int) -> 'argparse.Namespace': ...\ndef h(x: int) -> int: ...\n")
    assert _namespace_functions(src) == ["f (line 2)", "g (line 3)"]


def test_every_module_has_at_most_500_lines():
    long = {}
    for module in _modules():
        with open(os.path.join(PKG, module), encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[module] = n
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_no_library_function_takes_parsed_options():
    offenders = {}
    for module in _modules():
        if module.startswith(CLI_LAYER):
            continue
        with open(os.path.join(PKG, module), encoding="utf-8") as f:
            found = _namespace_functions(f.read())
        if found:
            offenders[module] = found
    assert not offenders, f"library functions taking argparse.Namespace: {offenders}"
