"""Data-parallel serving on the CPU (``data_parallel_size=2``: two scheduler worker processes behind one front end):
concurrent greedy answers equal ``LLM.generate``, a chat's later turns land on the replica that cached its earlier
ones (and hit that cache), per-replica metrics, and a killed replica is restarted while the other one serves."""

from __future__ import annotations

import os
import re
import signal
import threading

import httpx
import openai
import pytest

from fastxlstm.checkpoint import load
from fastxlstm.engine import LLM
from fastxlstm.serving.app import build_app
from fastxlstm.serving.replicas import Replicas
from fastxlstm.serving.router import PrefixRouter
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread
from fastxlstm.serving.worker import WorkerSpec
from fastxlstm.tokenizer import Tokenizer

from .helpers import kill_worker, load_and_tag, serve_cli, wait_healthy, wait_restarted, worker_pids

CFG = {"model_name": "tiny", "max_slots": 4, "prefill_chunk": 16, "max_model_len": 1_000_000,
       "scheduler_process": True, "data_parallel_size": 2, "restart_backoff": 0.2}
PROMPTS = ["The quick brown fox", "Ein Bär läuft über die Brücke", "xLSTM is a recurrent", "日本語のテキスト",
           "The lazy dog jumps", "matrix memory", "Brücke — schön!", "over the lazy"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir, Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def tags(tmp_path_factory):
    return tmp_path_factory.mktemp("replica_env")


@pytest.fixture(scope="module")
def srv(tiny, tags):
    path, tok = tiny
    envs = ({"FASTXLSTM_TEST_REPLICA": "0"}, {"FASTXLSTM_TEST_REPLICA": "1"})  # as CUDA_VISIBLE_DEVICES on GPUs
    spec = WorkerSpec(load_and_tag, (str(path), str(tags)), replica_envs=envs)
    with ServerThread(build_app(spec, tok, ServeConfig(**CFG))) as server:
        yield server


def test_each_replica_gets_its_own_environment(srv, tags):
    assert sorted(p.read_text() for p in tags.iterdir()) == ["0", "1"]  # one worker each
    assert "FASTXLSTM_TEST_REPLICA" not in os.environ  # set only around each spawn


def test_replica_envs_give_each_replica_one_visible_gpu(monkeypatch):
    import torch

    from fastxlstm.serving.cli import replica_envs

    assert replica_envs(2, "cpu") == ()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert replica_envs(1, None) == ()
    assert replica_envs(3, None) == tuple({"CUDA_VISIBLE_DEVICES": d} for d in "012")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert replica_envs(2, "cuda") == ({"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"})
    with pytest.raises(ValueError, match="needs 3 GPUs, 2 visible"):
        replica_envs(3, "cuda")
    with pytest.raises(ValueError, match="pass --device cuda"):
        replica_envs(2, "cuda:1")


def replicas(server: ServerThread) -> Replicas:
    sched = server.server.config.app.state.server.scheduler
    assert isinstance(sched, Replicas)
    return sched


def samples(server: ServerThread, name: str) -> dict[str, float]:
    """``{replica label: value}`` of one metric (summed over its other labels)."""
    out: dict[str, float] = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        m = re.match(rf'{name}\{{(.*)\}} (\S+)$', line)
        if m:
            rep = re.search(r'replica="(\d+)"', m.group(1)).group(1)
            out[rep] = out.get(rep, 0.0) + float(m.group(2))
    return out


def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_router_prefers_the_prefix_owner_then_the_least_loaded():
    r = PrefixRouter(3, slack=4)
    assert r.choose([], {0: 0, 1: 0, 2: 0}) == (0, False)
    assert r.choose([], {0: 0, 1: 0, 2: 0}) == (1, False)  # ties go round-robin
    assert r.choose([], {0: 3, 1: 1, 2: 2}) == (1, False)
    r.record([11, 12, 13], 2)
    r.record([11, 99], 0)
    assert r.choose([11, 12, 13, 14], {0: 0, 1: 0, 2: 3}) == (2, True)  # the longest known prefix wins
    assert r.choose([11, 77], {0: 2, 1: 0, 2: 0}) == (0, True)  # block 11 was last sent to replica 0
    assert r.choose([11, 12, 13], {0: 0, 1: 0, 2: 4}) == (0, False)  # replica 2 too busy: least loaded
    assert r.choose([11, 12, 13], {0: 0, 1: 0}) == (0, True)  # replica 2 down: its blocks point nowhere
    r.forget(0)
    assert r.choose([11, 77], {0: 0, 1: 0, 2: 0})[1] is False
    small = PrefixRouter(2, slack=1, max_blocks=2)
    small.record([1, 2, 3], 1)
    assert len(small) == 2 and small.choose([1], {0: 0, 1: 0})[1] is False  # the oldest block was evicted


def test_concurrent_greedy_requests_equal_llm_generate(srv, tiny):
    want = LLM(load(tiny[0]), tiny[1], max_slots=8).generate(PROMPTS, max_new_tokens=20, temperature=0.0)
    before = samples(srv, "fastxlstm_router_requests_total")
    got: dict[int, openai.types.Completion] = {}

    def one(i: int) -> None:
        got[i] = client(srv).completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=20, temperature=0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, w in enumerate(want):
        c = got[i].choices[0]
        assert c.text == w.text and c.finish_reason == w.finish_reason, i
        assert got[i].usage.completion_tokens == len(w.token_ids)
    after = samples(srv, "fastxlstm_router_requests_total")
    served = {k: after.get(k, 0) - before.get(k, 0) for k in ("0", "1")}
    assert sum(served.values()) == len(PROMPTS) and min(served.values()) > 0, served  # both replicas worked


def test_chat_turns_go_to_the_replica_holding_their_prefix(srv):
    c = client(srv)
    chats = {"a": [{"role": "system", "content": "You are terse. " * 8}],
             "b": [{"role": "system", "content": "Ein Bär läuft über die Brücke. " * 6}]}
    home: dict[str, str] = {}

    def turn(name: str, text: str) -> tuple[str, int]:
        """One user turn of chat ``name``: (the replica whose cache counts moved, cached prompt tokens)."""
        before = samples(srv, "fastxlstm_prompt_tokens_total")
        chats[name].append({"role": "user", "content": text})
        r = c.chat.completions.create(model="tiny", messages=chats[name], max_tokens=6, temperature=0)
        chats[name].append({"role": "assistant", "content": r.choices[0].message.content})
        after = samples(srv, "fastxlstm_prompt_tokens_total")
        moved = [k for k in after if after[k] != before.get(k, 0)]
        assert len(moved) == 1, (before, after)
        return moved[0], r.usage.prompt_tokens_details.cached_tokens

    routed_before = _route_counts(srv)
    home["a"], _ = turn("a", "The quick brown fox?")
    home["b"], _ = turn("b", "The lazy dog?")
    assert home["a"] != home["b"]  # equal loads: the second chat goes to the other replica
    # B before A, so that plain round-robin would swap them
    for name, text in [("b", "xLSTM?"), ("a", "matrix memory?"), ("a", "schön!"), ("b", "日本語?")]:
        replica, cached = turn(name, text)
        assert replica == home[name], (name, home)
        assert cached > 0  # its earlier turns' states were in that replica's cache
    routes = _route_counts(srv)
    assert routes["affinity"] - routed_before.get("affinity", 0) == 4  # the later turns, by prefix
    assert routes["least_loaded"] - routed_before.get("least_loaded", 0) == 2  # the first turns


def _route_counts(server: ServerThread) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r'fastxlstm_router_requests_total\{.*route="(\w+)".*\} (\S+)$', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def test_metrics_are_labelled_per_replica(srv):
    text = httpx.get(srv.base_url + "/metrics").text
    types = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), types  # each family once
    assert samples(srv, "fastxlstm_slots_total") == {"0": 4.0, "1": 4.0}
    assert samples(srv, "fastxlstm_replica_up") == {"0": 1.0, "1": 1.0}
    assert "fastxlstm_requests_total{" in text  # the front end's own counts
    health = httpx.get(srv.base_url + "/health").json()
    assert health["status"] == "ok" and health["slots_total"] == 8
    assert [r["replica"] for r in health["replicas"]] == [0, 1]


def test_a_killed_replica_fails_its_requests_and_restarts(srv):
    reps = replicas(srv)
    victim = reps.proxies[1]
    old_pid = victim.pid
    c = client(srv)
    # hold replica 0 busy so that the long stream goes to replica 1
    streams = [c.completions.create(model="tiny", prompt=f"The quick {i}", max_tokens=500_000, stream=True,
                                    extra_body={"ignore_eos": True}) for i in range(2)]
    its = [iter(s) for s in streams]
    for it in its:
        next(it)
    assert reps.proxies[0].load == 1 and victim.load == 1
    kill_worker(old_pid, its[1])
    # while replica 1 restarts, replica 0 serves (the long stream there still runs)
    r = c.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    next(its[0])
    wait_restarted(victim, old_pid)
    assert samples(srv, "fastxlstm_worker_restarts_total") == {"1": 1.0}
    assert samples(srv, "fastxlstm_replica_up") == {"0": 1.0, "1": 1.0}
    streams[0].close()
    health = httpx.get(srv.base_url + "/health").json()
    assert [h["status"] for h in health["replicas"]] == ["ok", "ok"]


def test_cli_data_parallel_exits_1_when_a_worker_dies_past_its_restarts():
    """``fastxlstm serve --data-parallel-size 2 --worker-restarts 0``: both replicas serve; kill -9 of one
    worker makes the server give up and exit with status 1 (for its supervisor to restart it)."""
    proc, base = serve_cli("--model", "random:xlstm-tiny", "--served-model-name", "t", "--data-parallel-size", "2",
                           "--max-slots", "2", "--worker-restarts", "0", "--log-level", "warning")
    try:
        wait_healthy(proc, base, timeout=180)
        health = httpx.get(base + "/health").json()
        assert [r["status"] for r in health["replicas"]] == ["ok", "ok"] and health["slots_total"] == 4
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert c.completions.create(model="t", prompt="hello", max_tokens=3).usage.completion_tokens == 3
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=90) == 1
        out = proc.stdout.read()
        assert "giving up" in out and "worker_restarts=0" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
