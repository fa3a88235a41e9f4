"""``torchrun --nproc_per_node N -m fastxlstm.train CONFIG.yaml [--set section.key=value ...]``.

Also runs as a single process (``python -m fastxlstm.train CONFIG.yaml``, same as ``fastxlstm train``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastxlstm.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML training config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    from .training.config import TrainConfig
    from .training.trainer import run

    cfg = TrainConfig.load(args.config, args.overrides)
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
