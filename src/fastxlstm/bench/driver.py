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
from dataclasses import asdict
from pathlib import Path

from .common import Plan

ORDER = ("fastxlstm", "fastxlstm-fp8", "fastxlstm-int8", "official", "hf-xlstm", "llama")


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


def run(plan: Plan, systems: list[str], out_dir: str | Path, tag: str = "inference",
        command: str | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "benchmark": "inference", "date": _dt.date.today().isoformat(),
        "command": command or " ".join(sys.argv), "plan": asdict(plan), "systems": {},
    }
    for system in systems:
        part = out_dir / f".{tag}-{system}.json"
        part.unlink(missing_ok=True)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "fastxlstm.bench.worker", system, json.dumps(asdict(plan)), str(part)]
        print(f"[bench] {system} ...", flush=True)
        try:
            proc = subprocess.run(cmd, env=_env_for(system), timeout=plan.deadline_for(system) + 30)
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
        (out_dir / f"{tag}.json").write_text(json.dumps(results, indent=1))
        part.unlink(missing_ok=True)
        print(f"[bench] {system} done in {data['wall_s']} s, errors: {len(data['errors'])}", flush=True)
    return results
