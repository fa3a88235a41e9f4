"""Optional dependencies: which ``pip install 'fastxlstm[EXTRA]'`` provides what, and the one check every
optional import site calls (:func:`require`), so a missing package reads as a one-line hint
(``fastxlstm serve needs fastapi: pip install 'fastxlstm[serve]'``) instead of a traceback.

:data:`EXTRAS` lists the import names of each extra of ``pyproject.toml`` (a test keeps them in step).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> the modules it installs (import names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "pydantic", "prometheus_client", "jinja2", "xgrammar"),
    "triton": ("triton",),
    "eval": ("lm_eval", "accelerate", "matplotlib"),
}
#: modules of an extra that only one feature imports, when it is used (not checked by ``require(extra)``)
ON_USE = ("xgrammar",)  # structured output (serving/grammar.py)


class MissingDependency(ImportError):
    """An optional package is not installed; the message is the one-line install hint."""


def install_hint(extra: str) -> str:
    return f"pip install 'fastxlstm[{extra}]'"


def require(extra: str, modules: tuple[str, ...] | None = None, feature: str | None = None) -> None:
    """Import ``modules`` (default: the modules of ``extra`` but :data:`ON_USE`); :class:`MissingDependency`
    naming the missing ones and the extra that installs them. ``feature`` names what needs them."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    missing = []
    for name in modules or [m for m in EXTRAS[extra] if m not in ON_USE]:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
        except Exception as e:  # noqa: BLE001 - installed but broken (a failing import inside the package)
            missing.append(f"{name} (installed, but importing it failed: {type(e).__name__}: {e})")
    if missing:
        raise MissingDependency(f"{feature or 'this feature'} needs {', '.join(missing)}: {install_hint(extra)}")


def optional_import(name: str, extra: str, feature: str | None = None) -> ModuleType:
    """``importlib.import_module(name)``, or :class:`MissingDependency` with the hint for ``extra``."""
    require(extra, (name,), feature)
    return importlib.import_module(name)
