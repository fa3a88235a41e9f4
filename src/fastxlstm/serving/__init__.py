"""OpenAI-compatible HTTP serving: FastAPI app, continuous-batching scheduler, recurrent-state prefix cache.

``fastxlstm serve --model PATH`` starts it; :func:`build_app` builds the app over a loaded model, or, with
``fastxlstm serve --scheduler-process`` / a :class:`WorkerSpec`, over a worker process that loads the model and
runs the scheduler apart from the HTTP front end (no shared GIL; ``serving.worker``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "build_app", "create_app", "PrefixCache", "ChatTemplate", "Scheduler", "WorkerSpec"]

_WHERE = {"ServeConfig": "runtime", "build_app": "app", "create_app": "app", "PrefixCache": "prefix_cache",
          "ChatTemplate": "chat_template", "Scheduler": "scheduler", "WorkerSpec": "worker"}


def __getattr__(name: str) -> Any:  # lazy: `import fastxlstm.serving` does not pull in FastAPI
    if name in _WHERE:
        import importlib

        from ..extras import require

        require("serve", feature="fastxlstm.serving")
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
