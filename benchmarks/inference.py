"""Inference benchmarks (same as ``fastxlstm bench``): ``python benchmarks/inference.py --help``."""

import typer

from fastxlstm.bench.cli import bench

if __name__ == "__main__":
    typer.run(bench)
