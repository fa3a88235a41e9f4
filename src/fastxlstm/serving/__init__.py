"""OpenAI-compatible HTTP serving: FastAPI app, continuous-batching scheduler, recurrent-state prefix cache.

``fastxlstm serve --model PATH`` starts it; :func:`build_app` builds the app over a loaded model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "build_app", "create_app", "PrefixCache", "ChatTemplate", "Scheduler", "ModelSlots"]

_WHERE = {"ServeConfig": "app", "build_app": "app", "create_app": "app", "PrefixCache": "prefix_cache",
          "ChatTemplate": "chat_template", "Scheduler": "scheduler", "ModelSlots": "slots"}


def __getattr__(name: str) -> Any:  # lazy: `import fastxlstm.serving` does not pull in FastAPI
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
