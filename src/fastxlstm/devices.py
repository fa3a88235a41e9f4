"""Device and dtype arguments: the one parser behind ``LLM(device=, dtype=)``, ``fastxlstm.load`` (through
:func:`~fastxlstm.checkpoint.load_model_and_tokenizer`), the CLI's ``--device`` / ``--dtype`` and the lm-eval
backend's ``model_args``.

dtype names are vLLM's: ``auto`` (the default: bfloat16 on CUDA, float32 on the CPU), ``half`` / ``float16``,
``bfloat16``, ``float`` / ``float32``; ``fp16``, ``bf16``, ``fp32`` and ``torch.<name>`` spellings are accepted
too, as are ``torch.dtype`` objects.
"""

from __future__ import annotations

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {
    "half": torch.float16, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float": torch.float32, "float32": torch.float32, "fp32": torch.float32,
}
#: what ``--dtype`` lists in its help and errors
DTYPE_CHOICES = ("auto", "half", "bfloat16", "float16", "float32")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``torch.dtype`` for a dtype name (None for ``auto`` / None: the device's default, :func:`default_dtype`);
    ValueError naming the choices for anything else."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {value}")
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {value!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_NAMES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (None: CUDA when available, else the CPU); ValueError for a malformed name and
    for a CUDA device this machine does not have (instead of torch's assertion deep inside the first kernel)."""
    if device is None:
        return torch.device(default_device())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev
