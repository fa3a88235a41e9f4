"""Runs the systems one after another (each in a fresh process, so one system's crash or memory
never affects another), merges their results into one JSON, draws the plots and the table."""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from .common import Plan, write_json

ORDER = ("fastxlstm", "fastxlstm-fp8", "fastxlstm-int8", "official", "hf-xlstm", "llama", "mamba2")


def _env_for(system: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if system == "hf-xlstm":
        # transformers switches to the official package's blocks when ``xlstm`` is importable;
        # this peer is transformers as shipped, so that package is hidden from it.
        spec = importlib.util.find_spec("xlstm")
        if spec is not None and spec.origin:
            site = str(Path(spec.origin).parent.parent)
            parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(
                site).resolve()]
            env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


#: the result lists of a system's JSON (a system that filled none of them measured nothing)
MEASUREMENTS = ("decode", "ttft", "prefill", "generate")


def failed_everywhere(results: dict) -> bool:
    """True when no system of a run measured anything (``fastxlstm bench`` then exits with status 1)."""
    return not any(data.get(kind) for data in results["systems"].values() for kind in MEASUREMENTS)


KILL_GRACE_S = 30.0  # a worker past its deadline gets this long to finish its row before it is killed


def run(plan: Plan, systems: list[str], out_dir: str | Path, tag: str = "inference",
        command: str | None = None, budget_s: float | None = None) -> dict:
    """Each system in its own process, one after another. ``budget_s``: the whole run's wall-clock
    limit; a system's deadline is cut to what is left of it (a system with under a minute left is
    skipped, and recorded as such)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "benchmark": "inference", "date": _dt.date.today().isoformat(),
        "command": command or " ".join(sys.argv), "plan": asdict(plan), "systems": {},
    }
    start = time.monotonic()
    for system in systems:
        part = out_dir / f".{tag}-{system}.json"
        part.unlink(missing_ok=True)
        t0 = time.monotonic()
        deadline = plan.deadline_for(system)
        if budget_s is not None:
            left = budget_s - (t0 - start) - KILL_GRACE_S
            if left < 60:
                results["systems"][system] = {"system": system, "errors": [
                    {"what": "system", "error": f"skipped: {left + KILL_GRACE_S:.0f} s of the run's budget left"}]}
                continue
            deadline = min(deadline, left)
        sub = replace(plan, deadlines={**plan.deadlines, system: deadline})
        cmd = [sys.executable, "-m", "fastxlstm.bench.worker", system, json.dumps(asdict(sub)), str(part)]
        print(f"[bench] {system} (deadline {deadline:.0f} s) ...", flush=True)
        try:
            proc = subprocess.run(cmd, env=_env_for(system), timeout=deadline + KILL_GRACE_S)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        data = json.loads(part.read_text()) if part.exists() else {"system": system, "errors": []}
        data.setdefault("errors", [])
        if rc != 0:
            data["errors"].append({"what": "process", "error": f"exit {rc}"})
        data["wall_s"] = round(time.monotonic() - t0, 1)
        results["systems"][system] = data
        if "device" in data:
            results["device"] = data["device"]
        write_json(out_dir / f"{tag}.json", results)
        part.unlink(missing_ok=True)
        print(f"[bench] {system} done in {data['wall_s']} s, errors: {len(data['errors'])}", flush=True)
    write_json(out_dir / f"{tag}.json", results)
    return results
