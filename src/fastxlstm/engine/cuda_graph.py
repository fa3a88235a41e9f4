"""Capturing a CUDA graph after warm-up runs (Triton compiles and autotuning happen outside the capture)."""

from __future__ import annotations

import torch


def capture_graph(fn, warmup: int = 2, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` ``warmup`` times on a side stream, then capture one call as a CUDA graph.

    Returns the graph and what the captured call returned (its output buffers, refreshed by replays).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
