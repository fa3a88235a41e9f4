"""Prometheus metrics of one server (own registry, so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fastxlstm_requests", "HTTP API requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("fastxlstm_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.prefill_tokens = Counter("fastxlstm_prefill_tokens", "Prompt tokens actually prefilled (not cached)",
                                      registry=r)
        self.generation_tokens = Counter("fastxlstm_generation_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("fastxlstm_prefix_cache_hits", "Prefix cache lookups that found a prefix", registry=r)
        self.cache_misses = Counter("fastxlstm_prefix_cache_misses", "Prefix cache lookups that found nothing",
                                    registry=r)
        self.cache_hit_tokens = Counter("fastxlstm_prefix_cache_hit_tokens", "Prompt tokens served from the cache",
                                        registry=r)
        self.cache_bytes = Gauge("fastxlstm_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.cache_entries = Gauge("fastxlstm_prefix_cache_entries", "States held by the prefix cache", registry=r)
        self.slots_used = Gauge("fastxlstm_slots_used", "Sequence slots in use", registry=r)
        self.slots_total = Gauge("fastxlstm_slots_total", "Sequence slots", registry=r)
        self.waiting = Gauge("fastxlstm_requests_waiting", "Requests queued for a slot", registry=r)
        self.running = Gauge("fastxlstm_requests_running", "Requests holding slots", registry=r)
        self.finished = Counter("fastxlstm_sequences_finished", "Finished sequences by reason", ["reason"], registry=r)
        self.ttft = Histogram("fastxlstm_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fastxlstm_inter_token_latency_seconds",
                             "Time between consecutive token emissions (decode steps) while sequences run",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fastxlstm_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.decode_batch = Histogram("fastxlstm_decode_batch_size", "Sequences per decode step",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        # speculative decoding, under vLLM's names (its dashboards read them): a sequence's speculative steps that
        # verified drafts, the drafts verified, the drafts accepted (they became output)
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Speculative steps of a sequence that verified "
                                   "drafted tokens", registry=r)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens verified", registry=r)
        self.spec_accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens",
                                            "Drafted tokens accepted (they became output)", registry=r)
        self.errors = Counter("fastxlstm_request_errors", "Requests failed inside the engine", registry=r)
        self.loop_seconds = Counter("fastxlstm_scheduler_loop_seconds",
                                    "Wall time of the scheduler thread by phase (host work, GPU waits, idle)",
                                    ["phase"], registry=r)
        self.startup_seconds = Gauge("fastxlstm_startup_seconds",
                                     "Start-up time by phase (decode graphs, prefill graphs and warm-up)", ["phase"],
                                     registry=r)
        self.loop_cpu = Counter("fastxlstm_scheduler_cpu_seconds", "CPU time of the scheduler thread", registry=r)

    def render(self, include: set[str] | None = None, exclude: set[str] = frozenset()) -> bytes:
        """Prometheus text of every metric family (only those named in ``include``; none in ``exclude``)."""
        if include is None and not exclude:
            return generate_latest(self.registry)
        return generate_latest(_Families(self.registry, include, exclude))  # type: ignore[arg-type]


class _Families:
    """A registry view that yields some metric families only (``generate_latest`` calls ``collect``)."""

    def __init__(self, registry: CollectorRegistry, include: set[str] | None, exclude: set[str]):
        self.registry, self.include, self.exclude = registry, include, exclude

    def collect(self):
        for metric in self.registry.collect():
            if (self.include is None or metric.name in self.include) and metric.name not in self.exclude:
                yield metric


class LoopProfile:
    """Wall time of the scheduler loop by phase: each :meth:`lap` charges the time since the previous
    lap to ``phase`` (``*_wait``: blocked on the device's results; ``idle``: nothing to do)."""

    __slots__ = ("seconds", "_mark", "_cpu0", "_pushed", "_pushed_cpu", "_last_push")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()
        self._cpu0 = time.thread_time()
        self._pushed: dict[str, float] = {}
        self._pushed_cpu = 0.0
        self._last_push = 0.0

    def restart(self) -> None:
        """Start timing in the calling thread (thread CPU time is per thread)."""
        self._mark, self._cpu0 = time.perf_counter(), time.thread_time()

    def lap(self, phase: str) -> None:
        t = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + (t - self._mark)
        self._mark = t

    def push(self, metrics: Metrics, force: bool = False) -> None:
        """Add what accrued since the last push to the Prometheus counters (at most every 0.25 s)."""
        if not force and self._mark - self._last_push < 0.25:
            return
        self._last_push = self._mark
        for phase, total in self.seconds.items():
            delta = total - self._pushed.get(phase, 0.0)
            if delta > 0:
                metrics.loop_seconds.labels(phase=phase).inc(delta)
                self._pushed[phase] = total
        cpu = time.thread_time() - self._cpu0
        if cpu > self._pushed_cpu:
            metrics.loop_cpu.inc(cpu - self._pushed_cpu)
            self._pushed_cpu = cpu

