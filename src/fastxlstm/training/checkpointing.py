"""Training checkpoints with ``torch.distributed.checkpoint`` (sharded, one file per rank), atomic.

Each checkpoint is written into ``<dir>/.step-NNNNNNN.tmp`` and renamed to ``<dir>/step-NNNNNNN``
by rank 0 once every rank has finished, then ``<dir>/latest`` is replaced atomically. A kill at
any moment leaves either the previous complete checkpoint or the new one, never a half-written
one that resume would pick up. Works with FSDP2-sharded models and with plain single-process ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import DistEnv, barrier, broadcast_object

_STEP_RE = re.compile(r"^step-(\d{7})$")
STATE_FILE = "trainer_state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (those with their trainer state written), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / STATE_FILE).exists() and (p / ".metadata").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
         trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Collective: every rank must call it."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # single process: no process group is expected
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if env.is_main:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer state in place (collective); returns the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((Path(path) / STATE_FILE).read_text())


def find_resume_point(root: Path, env: DistEnv) -> Path | None:
    """Rank 0 picks the newest complete checkpoint; all ranks agree on it."""
    choice = str(latest_checkpoint(Path(root)) or "") if env.is_main else None
    choice = broadcast_object(choice)
    return Path(choice) if choice else None
