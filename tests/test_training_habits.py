"""Trainer habits: the start-up summary, a checkpoint on SIGTERM / Ctrl-C, the long-run warning,
metrics appended (not rewritten) on resume, the CPU fine-tuning config, exports with normal permissions."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastxlstm.training import checkpointing
from fastxlstm.training.config import TrainConfig
from fastxlstm.training.trainer import METRICS_FIELDS, CSVLog, run

from .training_helpers import read_losses, synthetic_data, tiny_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"), n_train=20_000, n_val=2_000)


def _rows(path: Path) -> int:
    if not path.exists():
        return 0
    return max(0, len(path.read_text().splitlines()) - 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_then_the_same_command_resumes(data, tmp_path, sig):
    cfg = tiny_config(tmp_path / "c.yaml", data, tmp_path / "run", train={"steps": 10**7},
                      checkpoint={"every": 0}, export={"enabled": True})
    proc = subprocess.Popen([sys.executable, "-m", "fastxlstm.train", str(cfg)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _rows(tmp_path / "run" / "metrics.csv") < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    last = read_losses(tmp_path / "run")[-1][0]
    assert f"stopped by {sig.name} after step {last}" in out
    ckpt = checkpointing.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{last:07d}" and checkpointing.verify(ckpt) is None
    # the start-up summary and the long-run warning (10 million steps)
    assert "train: xlstm XLSTMConfig defaults" in out and "parameters" in out
    assert "train: 128 tokens per step (4 sequences x 32 tokens x 1 accumulation x 1 process(es))" in out
    assert "train: devices 1 x cpu, precision fp32" in out and f"writes {tmp_path / 'run'}/" in out
    assert "warning: at" in out and "s per step on 1 x cpu, the remaining" in out and " h (evaluation" in out
    assert not (tmp_path / "run" / "final").exists()  # stopped, not finished: no export
    if sig == signal.SIGTERM:
        r = subprocess.run([sys.executable, "-m", "fastxlstm.train", str(cfg), "--set", f"train.steps={last + 2}"],
                           env=ENV, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from {ckpt}" in r.stdout and "warning: at" not in r.stdout
        assert [s for s, _ in read_losses(tmp_path / "run")] == list(range(1, last + 3))


def _metrics(path: Path, steps: range, tail: str = "") -> bytes:
    lines = [",".join(METRICS_FIELDS)] + [f"{s},{1 / s:.6f},1.0,1e-3,{s * 10},100.0,,{s}.00" for s in steps]
    path.write_bytes(("\r\n".join(lines) + "\r\n" + tail).encode())
    return path.read_bytes()


def test_resume_truncates_after_the_checkpoint_and_appends(tmp_path):
    path = tmp_path / "metrics.csv"
    before = _metrics(path, range(1, 11), tail="11,0.090909,1.0,1e-3,110,100.0,,11.")  # killed writing row 11
    inode = path.stat().st_ino
    log = CSVLog(path, METRICS_FIELDS, resume_step=12)
    kept = path.read_bytes()
    assert kept == before[: before.rindex(b"\n") + 1] and path.stat().st_ino == inode  # half row 11 cut
    log.write([{"step": 11, "loss": "0.5"}])
    with path.open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 12))
    CSVLog(path, METRICS_FIELDS, resume_step=8)
    assert path.read_bytes() == kept[: len(kept.split(b"\r\n9,")[0]) + 2]


def test_resume_never_rewrites_the_rows_it_keeps(tmp_path, monkeypatch):
    """A failure while resuming (here: every CSV write fails, as on a full disk) must not lose the history."""
    path = tmp_path / "metrics.csv"
    before = _metrics(path, range(1, 11))

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    monkeypatch.setattr(csv.DictWriter, "writeheader", fail)
    CSVLog(path, METRICS_FIELDS, resume_step=10)
    assert path.read_bytes() == before
    CSVLog(path, METRICS_FIELDS, resume_step=4)
    assert path.read_bytes() == before[: len(before.split(b"\r\n5,")[0]) + 2]


def test_resume_with_other_columns_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n1,2.0\n")
    CSVLog(path, METRICS_FIELDS, resume_step=1)
    assert (tmp_path / "metrics.csv.old").read_text() == "step,loss\n1,2.0\n"
    assert path.read_text().strip() == ",".join(METRICS_FIELDS)


def test_cpu_finetune_config_runs_and_exports_readable_dirs(data, tmp_path, monkeypatch):
    from fastxlstm.checkpoint import load

    monkeypatch.chdir(REPO)  # the config names models/xlstm-shakespeare-10m relative to the repository
    old = os.umask(0o022)
    try:
        cfg = TrainConfig.load(REPO / "configs" / "finetune-cpu.yaml", [
            f"data.path={data}", f"out_dir={tmp_path / 'ft'}", "train.steps=2", "data.seq_len=64",
            "eval.tokens=512", "checkpoint.every=0", "log.progress=false"])
        assert cfg.train.device == "cpu" and cfg.model.init_from == "models/xlstm-shakespeare-10m"
        summary = run(cfg)
    finally:
        os.umask(old)
    assert summary["parameters"] > 10_000_000 and summary["final_val_loss"] is not None
    for name in ("final", "best"):
        out = tmp_path / "ft" / name
        assert out.stat().st_mode & 0o777 == 0o755, name
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir()), name
    assert load(tmp_path / "ft" / "final").config.vocab_size == 8192


def test_export_dtype_reads_the_devices_names():
    import torch

    from fastxlstm.training.export import export_dtype

    assert export_dtype("float32") is export_dtype("fp32") is torch.float32
    assert export_dtype("bfloat16") is export_dtype("bf16") is export_dtype(torch.bfloat16) is torch.bfloat16
    assert export_dtype("float16") is export_dtype("half") is torch.float16
    for bad in ("auto", "int8", "float64", None, torch.int64):
        with pytest.raises(ValueError, match=r"export dtype must be one of half, bfloat16, float16, float32"):
            export_dtype(bad)
