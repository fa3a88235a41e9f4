"""Several training processes on the CPU (gloo) through torchrun: SIGTERM to the agent writes one consistent
checkpoint and the same command resumes exactly; two local "nodes" meeting at a c10d rendezvous
(``torchrun --nnodes 2 --rdzv-backend c10d``) train as one process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastxlstm.training import checkpointing

from .helpers import free_port
from .training_helpers import read_losses, synthetic_data, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# two ranks x 2 sequences == one process x 2 sequences x 2 accumulation steps; a constant learning rate (after
# warm-up), so a run's losses do not depend on its total step count
TWO = {"train": {"micro_batch_size": 2, "grad_accum": 1}, "optim": {"schedule": "constant", "warmup_steps": 3}}
ONE = {"train": {"micro_batch_size": 2, "grad_accum": 2}, "optim": {"schedule": "constant", "warmup_steps": 3}}
REF_STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"), n_train=20_000, n_val=2_000)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> list[tuple[int, float]]:
    """The losses of one process over REF_STEPS steps (what two processes must reproduce)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = tiny_config(tmp / "one.yaml", data, tmp / "one", train={**ONE["train"], "steps": REF_STEPS},
                      optim=ONE["optim"])
    r = subprocess.run([sys.executable, "-m", "fastxlstm.train", str(cfg)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_losses(tmp / "one")


def _rows(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def test_sigterm_to_torchrun_writes_one_checkpoint_and_the_same_command_resumes(data, reference, tmp_path):
    cfg = tiny_config(tmp_path / "two.yaml", data, tmp_path / "run", train={**TWO["train"], "steps": 10**6},
                      optim=TWO["optim"], checkpoint={"every": 0, "keep": 2})
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "fastxlstm.train", str(cfg)]
    agent = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _rows(tmp_path / "run" / "metrics.csv") < 3 and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.poll() is None, agent.communicate()[1][-3000:]
    agent.send_signal(signal.SIGTERM)  # to the agent, as a scheduler or `kill` would: it forwards to its workers
    out, err = agent.communicate(timeout=120)
    assert agent.returncode != 0  # torchrun reports the signal
    steps = [s for s, _ in read_losses(tmp_path / "run")]
    last = steps[-1]
    assert steps == list(range(1, last + 1))
    assert f"stopped by SIGTERM after step {last}" in out, (out[-2000:], err[-3000:])
    ckpts = tmp_path / "run" / "checkpoints"
    written = sorted(p.name for p in ckpts.iterdir())
    assert written == ["latest", f"step-{last:07d}"], written  # one checkpoint, no debris of a second one
    ckpt = checkpointing.latest_checkpoint(ckpts)
    assert ckpt is not None and checkpointing.verify(ckpt) is None  # complete: every file matches its checksum
    assert len(list(ckpt.glob("*.distcp"))) == 2  # both ranks' shards
    assert last + 3 <= REF_STEPS
    r = subprocess.run([*command, "--set", f"train.steps={last + 3}"], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt}" in r.stdout
    resumed = read_losses(tmp_path / "run")
    assert [s for s, _ in resumed] == list(range(1, last + 4))
    assert [v for _, v in resumed] == pytest.approx([v for _, v in reference[: last + 3]], rel=1e-4, abs=1e-5)


def test_two_nodes_at_a_c10d_rendezvous_match_one_process(data, reference, tmp_path):
    cfg = tiny_config(tmp_path / "nodes.yaml", data, tmp_path / "nodes", train={**TWO["train"], "steps": 6},
                      optim=TWO["optim"], checkpoint={"every": 6})
    port = free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "t",
                               "-m", "fastxlstm.train", str(cfg)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        results = [(p.communicate(timeout=300), p.returncode) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for (_, err), code in results:
        assert code == 0, err[-3000:]
    assert "2 process(es)" in results[0][0][0] + results[1][0][0]  # one run of two ranks, not two runs
    losses = read_losses(tmp_path / "nodes")
    assert [s for s, _ in losses] == list(range(1, 7))
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference[:6]], rel=1e-4, abs=1e-5)
    ckpt = checkpointing.latest_checkpoint(tmp_path / "nodes" / "checkpoints")
    assert ckpt is not None and len(list(ckpt.glob("*.distcp"))) == 2
