"""Runs one system in its own process: ``python -m fastxlstm.bench.worker SYSTEM PLAN_JSON OUT_JSON``."""

from __future__ import annotations

import json
import sys
import traceback

from .common import Plan, Recorder, device_name


def main(argv: list[str] | None = None) -> int:
    system, plan_json, out = (argv or sys.argv[1:])[:3]
    plan = Plan.from_dict(json.loads(plan_json))
    rec = Recorder(system, out, plan.deadline_for(system))
    rec.set("device", device_name())
    try:
        from .systems import SYSTEMS

        SYSTEMS[system](plan, rec)
    except Exception as e:  # noqa: BLE001  (recorded, never fatal for the run)
        rec.error("system", e)
        rec.set("traceback", traceback.format_exc()[-4000:])
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
