"""Runs one system in its own process: ``python -m fastxlstm.bench.worker SYSTEM PLAN_JSON OUT_JSON``."""

from __future__ import annotations

import json
import sys
import traceback

from .common import Plan, Recorder, device_name, on_cuda


def systems() -> dict:
    """Every benchmarked system: name -> ``run(plan, recorder)``."""
    from .mamba2 import run_mamba2
    from .systems import SYSTEMS

    return {**SYSTEMS, "mamba2": run_mamba2}


def _pci_bus_id() -> str | None:
    """The CUDA device's PCI bus id in NVML's spelling (NVML and CUDA may number GPUs differently)."""
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    if not hasattr(p, "pci_bus_id"):
        return None
    return f"{getattr(p, 'pci_domain_id', 0):08X}:{p.pci_bus_id:02X}:{getattr(p, 'pci_device_id', 0):02X}.0"


def main(argv: list[str] | None = None) -> int:
    system, plan_json, out = (argv or sys.argv[1:])[:3]
    plan = Plan.from_dict(json.loads(plan_json))
    rec = Recorder(system, out, plan.deadline_for(system), energy_s=plan.energy_s)
    rec.set("device", device_name())
    if plan.energy_s > 0 and on_cuda():
        from .energy import open_meter

        rec.meter, why = open_meter(_pci_bus_id())
        rec.set("energy", rec.meter.describe() if rec.meter else {"unavailable": why})
    try:
        systems()[system](plan, rec)
    except Exception as e:  # noqa: BLE001  (recorded, never fatal for the run)
        rec.error("system", e)
        rec.set("traceback", traceback.format_exc()[-4000:])
        return 1
    finally:
        if rec.meter is not None:
            rec.meter.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
