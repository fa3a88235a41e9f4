"""The benchmark scripts import only what the package has: every ``from fastxlstm... import name`` in
``benchmarks/*.py`` and ``tests/helpers.py`` (module level and inside functions, read with :mod:`ast`) names
a module or an attribute that exists. The scripts run on the GPU machine only, so a renamed helper would
otherwise be found there, after the device time is spent. A script runs with ``benchmarks/`` first on
``sys.path``, so its name must not be that of a package a library looks for: ``benchmarks/kernels.py`` made
transformers take it for the hub's ``kernels`` package and fail on import."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py")) + [ROOT / "tests" / "helpers.py"]


def _fastxlstm_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` of every absolute import of the package in ``path`` (name None: ``import m``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fastxlstm":
            out.extend((node.lineno, node.module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "fastxlstm")
    return out


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_resolve(path):
    missing = []
    for line, module, name in _fastxlstm_imports(path):
        mod = importlib.import_module(module)
        if name is None or hasattr(mod, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError:
            missing.append(f"{path.name}:{line}: from {module} import {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_function_level_imports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from fastxlstm.checkpoint import no_such_helper\n")
    assert _fastxlstm_imports(script) == [(2, "fastxlstm.checkpoint", "no_such_helper")]


# top-level names libraries probe for with find_spec and then import (transformers: kernels, lm-eval: vllm, ...)
PROBED = {"kernels", "vllm", "sglang", "peft", "accelerate", "deepspeed", "flash_attn", "mamba_ssm", "xlstm",
          "mlstm_kernels", "triton", "bitsandbytes", "optimum", "torchao", "liger_kernel", "fla", "einops"}


def test_script_names_shadow_no_package():
    bench = str(ROOT / "benchmarks")
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(bench)]
    try:
        clashes = [p.name for p in SCRIPTS[:-1]
                   if p.stem in PROBED or p.stem in sys.stdlib_module_names or importlib.util.find_spec(p.stem)]
    finally:
        sys.path[:] = saved
    assert not clashes, f"benchmark scripts named like an importable package: {clashes}"
