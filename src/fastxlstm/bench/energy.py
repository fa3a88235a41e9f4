"""GPU energy per token from NVML (``nvidia-ml-py``, imported as ``pynvml``).

Method: a background thread samples the board power (``nvmlDeviceGetPowerUsage``, mW) every
``interval_s``; a measured region reads the board's total-energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver loaded) before and after, or, where the
counter is not supported, integrates the power samples over the region (trapezoids, the power at the
region's edges interpolated linearly). The idle baseline is the mean power over a quiet interval at
the worker's start; ``net_j`` = gross joules - idle watts x the region's seconds: the energy the work
added on top of an idle GPU. Whole-board figures (GPU, HBM, board), not the host's.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Samples = list[tuple[float, float]]  # (seconds, watts), increasing time


def power_at(samples: Samples, t: float) -> float:
    """Power at ``t``, linear between samples, held at the first / last sample outside them."""
    if not samples:
        raise ValueError("no power samples")
    times = [s[0] for s in samples]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return samples[0][1]
    if i == len(samples):
        return samples[-1][1]
    (ta, wa), (tb, wb) = samples[i - 1], samples[i]
    return wa if tb == ta else wa + (wb - wa) * (t - ta) / (tb - ta)


def integrate(samples: Samples, t0: float, t1: float) -> float:
    """Joules between ``t0`` and ``t1`` from power samples (trapezoid rule; see :func:`power_at`)."""
    if t1 < t0:
        raise ValueError(f"region ends before it starts ({t0} > {t1})")
    pts = [(t0, power_at(samples, t0))] + [s for s in samples if t0 < s[0] < t1] + [(t1, power_at(samples, t1))]
    return sum((tb - ta) * (wa + wb) / 2 for (ta, wa), (tb, wb) in zip(pts, pts[1:]))


@dataclass
class Reading:
    """One measured region: ``calls`` calls of the measured function."""

    joules: float  # gross, whole board
    seconds: float
    calls: int
    idle_w: float
    method: str  # "energy-counter" or "power-integral"
    mean_w: float
    samples: int  # power samples inside the region

    @property
    def net_j(self) -> float:
        """Joules above the idle baseline (may be slightly negative for a region at idle power)."""
        return self.joules - self.idle_w * self.seconds

    def per_token(self, tokens_per_call: int) -> dict[str, Any]:
        """The row fields: joules per token (gross and net) and how they were measured."""
        n = tokens_per_call * self.calls
        return {"j_per_token": self.net_j / n, "j_per_token_gross": self.joules / n, "energy_s": self.seconds,
                "energy_calls": self.calls, "mean_w": self.mean_w, "idle_w": self.idle_w,
                "energy_method": self.method}


class EnergyMeter:
    """NVML power sampler + energy counter for one GPU (``nvml``: the ``pynvml`` module or a stand-in)."""

    def __init__(self, nvml: Any = None, pci_bus_id: str | None = None, interval_s: float = 0.01,
                 clock: Callable[[], float] = time.monotonic, max_samples: int = 1 << 20):
        if nvml is None:
            import pynvml as nvml
        self.nvml, self.clock, self.interval_s = nvml, clock, interval_s
        nvml.nvmlInit()
        self.handle = (nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id) if pci_bus_id
                       else nvml.nvmlDeviceGetHandleByIndex(0))
        self.name = nvml.nvmlDeviceGetName(self.handle)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
        except nvml.NVMLError:
            self.counter = False
        self.idle_w = 0.0
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_samples)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-power", daemon=True)
        self._thread.start()

    @property
    def method(self) -> str:
        return "energy-counter" if self.counter else "power-integral"

    def _run(self) -> None:
        while not self._stop.is_set():
            w = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3
            with self._lock:
                self._samples.append((self.clock(), w))
            self._stop.wait(self.interval_s)

    def samples(self, t0: float = -math.inf, t1: float = math.inf) -> Samples:
        with self._lock:
            return [s for s in self._samples if t0 <= s[0] <= t1]

    def _energy_j(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3

    def _wait_for_sample_after(self, t: float) -> None:
        deadline = self.clock() + 50 * self.interval_s + 0.5
        while self.clock() < deadline and not self.samples(t):
            time.sleep(self.interval_s / 4)

    def region(self, fn: Callable[[], Any], calls: int = 1, sync: Callable[[], None] = lambda: None) -> Reading:
        """Run ``fn`` ``calls`` times back to back (``sync`` waits for the device before and after) and
        read the energy the region used."""
        sync()
        e0 = self._energy_j() if self.counter else 0.0
        t0 = self.clock()
        for _ in range(calls):
            fn()
        sync()
        t1 = self.clock()
        e1 = self._energy_j() if self.counter else 0.0
        self._wait_for_sample_after(t1)  # power samples on both sides of the region's end
        inside = self.samples(t0, t1)
        pts = self.samples(t0 - 10 * self.interval_s - 0.1, t1 + 10 * self.interval_s + 0.1)
        gross = integrate(pts, t0, t1)
        joules = e1 - e0 if self.counter else gross
        seconds = t1 - t0
        return Reading(joules=joules, seconds=seconds, calls=calls, idle_w=self.idle_w, method=self.method,
                       mean_w=gross / seconds if seconds > 0 else float("nan"), samples=len(inside))

    def measure_idle(self, seconds: float = 2.0) -> float:
        """Mean power over ``seconds`` of doing nothing: the baseline subtracted from every region."""
        reading = self.region(lambda: time.sleep(seconds))
        self.idle_w = reading.joules / reading.seconds
        return self.idle_w

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass

    def describe(self) -> dict[str, Any]:
        return {"device": self.name if isinstance(self.name, str) else self.name.decode(), "method": self.method,
                "idle_w": self.idle_w, "interval_s": self.interval_s}


def calls_for(seconds_per_call: float, min_s: float) -> int:
    """How many back-to-back calls make a region of at least ``min_s`` (at least one)."""
    if not seconds_per_call > 0:
        return 1
    return max(1, math.ceil(min_s / seconds_per_call))


def open_meter(pci_bus_id: str | None = None, idle_s: float = 2.0) -> tuple[EnergyMeter | None, str]:
    """An :class:`EnergyMeter` for the GPU at ``pci_bus_id`` (None: NVML's device 0) with its idle
    baseline measured, or None and why not."""
    try:
        meter = EnergyMeter(pci_bus_id=pci_bus_id)
    except Exception as e:  # noqa: BLE001  (no NVML, no GPU, no permission: recorded)
        return None, f"{type(e).__name__}: {e}"
    meter.measure_idle(idle_s)
    return meter, ""


