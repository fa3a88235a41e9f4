"""The benchmark's own arithmetic and plumbing on the CPU: energy from a fake NVML, the grids and the
run budget, the Mamba2 peer's decode loop against transformers' generate, mamba_ssm's kernel loader."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from fastxlstm.bench import energy as en


# ------------------------------------------------------------------------------------ energy
def test_integrate_trapezoids_with_interpolated_edges():
    samples = [(0.0, 100.0), (1.0, 200.0), (3.0, 200.0)]
    assert en.power_at(samples, 0.5) == 150.0
    assert en.power_at(samples, -5.0) == 100.0 and en.power_at(samples, 9.0) == 200.0  # held outside
    # [0.5, 2]: (150 + 200) / 2 * 0.5 + 200 * 1
    assert en.integrate(samples, 0.5, 2.0) == pytest.approx(287.5, rel=1e-12)
    assert en.integrate(samples, -1.0, 0.0) == pytest.approx(100.0, rel=1e-12)
    assert en.integrate(samples, 0.0, 3.0) == pytest.approx(150.0 + 400.0, rel=1e-12)
    with pytest.raises(ValueError):
        en.integrate(samples, 2.0, 1.0)


def test_calls_for():
    assert en.calls_for(0.004, 1.0) == 250
    assert en.calls_for(3.0, 1.0) == 1
    assert en.calls_for(0.0, 1.0) == 1


class FakeNVML:
    """Board power that is ``idle_w`` except while ``busy`` is set; the energy counter is its exact
    integral (piecewise constant power, switched at recorded times)."""

    class NVMLError(Exception):
        pass

    def __init__(self, idle_w=100.0, busy_w=400.0, counter=True):
        self.idle_w, self.busy_w, self.counter = idle_w, busy_w, counter
        self.lock = threading.Lock()
        self.t_last, self.w, self.mj = time.monotonic(), idle_w, 0.0

    def _advance(self):
        now = time.monotonic()
        self.mj += self.w * (now - self.t_last) * 1e3
        self.t_last = now

    def set_busy(self, busy: bool):
        with self.lock:
            self._advance()
            self.w = self.busy_w if busy else self.idle_w

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "Fake GPU"

    def nvmlDeviceGetPowerUsage(self, h):
        with self.lock:
            return self.w * 1e3

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise self.NVMLError("Not Supported")
        with self.lock:
            self._advance()
            return self.mj


def _busy(nvml, seconds):
    def fn():
        nvml.set_busy(True)
        time.sleep(seconds)
        nvml.set_busy(False)
    return fn


@pytest.mark.parametrize("counter", [True, False])
def test_energy_meter_subtracts_idle_and_divides_by_tokens(counter):
    nvml = FakeNVML(counter=counter)
    meter = en.EnergyMeter(nvml=nvml, interval_s=0.002)
    try:
        assert meter.method == ("energy-counter" if counter else "power-integral")
        # the counter is read just outside the region's clock reads: a few µs of 100 W over 0.15 s
        assert meter.measure_idle(0.15) == pytest.approx(100.0, abs=1.0)
        busy_s = 0.2
        reading = meter.region(_busy(nvml, busy_s), calls=2)
        samples = meter.samples()
    finally:
        meter.close()
    # The work added (400 - 100) W for the two busy spells. The spells' exact length is the sleeps',
    # plus scheduling delay; the meter's own region length bounds it.
    assert reading.calls == 2 and reading.seconds >= 2 * busy_s
    expected = 300.0 * 2 * busy_s
    slack = 300.0 * (reading.seconds - 2 * busy_s) + 1.0  # delays in the region; counter/clock read skew
    if not counter:  # each of the 4 power switches is smeared over at most one sampling gap
        gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
        slack += 4 * 300.0 * max(gaps)
    assert abs(reading.net_j - expected) <= slack + 1e-6, (reading, expected, slack)
    row = reading.per_token(tokens_per_call=10)
    assert row["j_per_token"] == pytest.approx(reading.net_j / 20)
    assert row["j_per_token_gross"] == pytest.approx(reading.joules / 20)
    assert row["energy_method"] == meter.method and row["idle_w"] == pytest.approx(100.0, abs=1.0)


def test_open_meter_without_nvml_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    meter, why = en.open_meter()
    assert meter is None and "pynvml" in why


# ----------------------------------------------------------------------------- grids, budget
def test_grids_and_shapes_parse():
    import typer

    from fastxlstm.bench.cli import GRIDS, _ints, _shapes

    assert _shapes("1x65536,8x8192") == [[1, 65536], [8, 8192]]
    assert _shapes("-") == [] and _ints("-") == []
    for bad in ("8x", "x8", "8*8", "0x8"):
        with pytest.raises(typer.BadParameter):
            _shapes(bad)
    for name, grid in GRIDS.items():
        shapes = _shapes(grid["prefill_shapes"])
        if name in ("headline", "prefill"):  # the paper's prefill grid: batch x length = 64k tokens
            assert shapes and {b * s for b, s in shapes} == {65536}
        _ints(grid["batch_sizes"]), _ints(grid["prompt_lengths"]), _ints(grid["generate_lengths"])
    assert _ints(GRIDS["decode"]["batch_sizes"])[0] == 1 and _ints(GRIDS["decode"]["batch_sizes"])[-1] == 256
    assert _ints(GRIDS["ttft"]["prompt_lengths"])[0] == 128 and _ints(GRIDS["ttft"]["prompt_lengths"])[-1] == 131072
    assert _ints(GRIDS["generate"]["generate_lengths"]) == [64, 256, 1024, 4096, 16384]


def test_driver_budget_skips_systems_it_cannot_fit(tmp_path, monkeypatch):
    from fastxlstm.bench import driver
    from fastxlstm.bench.common import Plan

    started = []
    monkeypatch.setattr(driver.subprocess, "run", lambda cmd, **kw: started.append(cmd))
    res = driver.run(Plan(), ["fastxlstm", "llama"], tmp_path, tag="t", budget_s=50)
    assert started == []
    assert all("budget" in d["errors"][0]["error"] for d in res["systems"].values())
    assert (tmp_path / "t.json").exists()


# --------------------------------------------------------------------------------- Mamba2
def test_mamba2_static_decoder_matches_transformers_generate():
    """The Mamba2 peer's decode step (its own cache, in place: what the CUDA graph replays) gives the
    greedy tokens of transformers' own generate, after a reset to a new prompt too."""
    from fastxlstm.bench import mamba2
    from fastxlstm.bench.common import Plan
    from fastxlstm.bench.loops import _greedy_run

    torch.manual_seed(0)
    model, cfg = mamba2.build(small=True)
    plan = Plan(decode_prompt=8)
    dec = mamba2.make_decoder(model, plan, cfg.vocab_size, b=2)
    prompt = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = _greedy_run(dec, dec.step, prompt, 6)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours == ref[:, 12:].tolist()


def test_load_mamba_ssm_triton_skips_the_cuda_init(tmp_path, monkeypatch):
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import selective_scan_cuda  # the compiled extension a CPU build lacks\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text("def mamba_chunk_scan_combined(): return 'ssd'\n")
    (pkg / "ops" / "triton" / "selective_state_update.py").write_text("def selective_state_update(): return 1\n")
    dist = tmp_path / "mamba_ssm-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mamba_ssm\nVersion: 9.9\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("mamba_ssm")]:
        monkeypatch.delitem(sys.modules, name)
    from fastxlstm.bench.mamba2 import load_mamba_ssm_triton

    try:
        with pytest.raises(ImportError):  # the package as it is: its __init__ needs the CUDA extension
            __import__("mamba_ssm")
        sys.modules.pop("mamba_ssm", None)
        assert load_mamba_ssm_triton() == "9.9"
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        assert mamba_chunk_scan_combined() == "ssd"
    finally:
        for name in [m for m in sys.modules if m.startswith("mamba_ssm")]:
            del sys.modules[name]
