"""No import-time side effects on logging or warnings: importing engine code (as a library
user, a test or a benchmark does) must leave their logging and warnings as they were.
setup_logging installs the console's quieting filters, and close() takes them off."""

from __future__ import annotations

import ast
import io
import logging
import subprocess
import sys
from pathlib import Path

from engine.logsetup import QUIET_LIBRARIES, setup_logging

ROOT = Path(__file__).resolve().parents[1]
_GLOBAL_CHANGES = {"addFilter", "filterwarnings", "simplefilter", "basicConfig", "captureWarnings", "disable"}


def _module_level_calls(tree: ast.Module) -> list[ast.Call]:
    """Calls that run at import: in the module body, not inside a function or class body's methods."""
    calls: list[ast.Call] = []
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call):
            calls.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return calls


def test_no_engine_module_changes_logging_or_warnings_at_import() -> None:
    found = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for call in _module_level_calls(ast.parse(path.read_text(encoding="utf-8"))):
            name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            if name in _GLOBAL_CHANGES:
                found.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}")
    assert found == [], "move these into setup_logging or the function that needs them"


def test_importing_the_diffusion_package_installs_no_filter() -> None:
    code = (
        "import logging, engine.diffusion, engine.control, engine.web; "
        "print(sum(len(l.filters) for l in logging.Logger.manager.loggerDict.values() "
        "if isinstance(l, logging.Logger)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_setup_logging_quiets_library_chatter_until_closed() -> None:
    name, _ = QUIET_LIBRARIES[0]
    chatter = logging.getLogger(name)
    # caught on the library's own logger: once transformers is imported its loggers stop propagating
    seen = io.StringIO()
    catch = logging.StreamHandler(seen)
    chatter.addHandler(catch)
    setup = setup_logging("info", to_file=False, console=io.StringIO())
    try:
        chatter.warning("ImageProcessor requires torchvision (not installed); falling back to PIL")
        chatter.warning("something else worth seeing")
    finally:
        setup.close()
        chatter.removeHandler(catch)
    assert "torchvision" not in seen.getvalue() and "something else worth seeing" in seen.getvalue()
    assert chatter.filters == []
    setup_logging("info", to_file=False, console=io.StringIO(), logger=logging.getLogger("test.own")).close()
    assert chatter.filters == [], "a logger of the caller's own quiets no library"
