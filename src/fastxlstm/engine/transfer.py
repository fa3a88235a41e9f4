"""Host-to-device copies that never wait for queued GPU work."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(values: Sequence[int] | Sequence[float] | Tensor, device: torch.device,
              dtype: torch.dtype = torch.long) -> Tensor:
    """``values`` (a list or a tensor) on ``device``. On CUDA the copy is staged through pinned memory
    and is asynchronous: a blocking copy (``torch.tensor(values, device=cuda)``) waits for all queued work,
    and a non-blocking copy from pageable memory may too (the driver can stage it synchronously)."""
    if device.type != "cuda" or (isinstance(values, Tensor) and values.device.type != "cpu"):
        return torch.as_tensor(values, dtype=dtype).to(device)
    if isinstance(values, Tensor):
        return values.to(dtype).pin_memory().to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
