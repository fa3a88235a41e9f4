"""Serving building blocks without HTTP: prefix cache, stop-string streaming, chat templates, scheduler."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine.backend import EngineSlotBackend
from fastxlstm.sampling import SamplingParams
from fastxlstm.serving.chat_template import ChatTemplate, ChatTemplateError
from fastxlstm.serving.prefix_cache import PrefixCache, entry_nbytes
from fastxlstm.serving.requests import FinishEvent, GenerationRequest, PrefillDone, TokenEvent
from fastxlstm.serving.scheduler import Scheduler
from fastxlstm.text import StopText
from fastxlstm.tokenizer import Tokenizer

from .helpers import greedy_reference as generate
from .helpers import perturbed_model


def fake_state(value: float, layers: int = 2) -> list[tuple[torch.Tensor, ...]]:
    return [(torch.full((1, 2, 4, 4), value), torch.full((1, 2, 4), value), torch.full((1, 2), value))
            for _ in range(layers)]


# ------------------------------------------------------------------------------------------ prefix cache
def test_prefix_cache_longest_prefix_and_isolation():
    cache = PrefixCache(max_bytes=10**6)
    s1, s2 = fake_state(1.0), fake_state(2.0)
    cache.insert([1, 2, 3], s1)
    cache.insert([1, 2, 3, 4, 5], s2, logits=torch.arange(4.0))
    s1[0][0].fill_(99.0)  # the caller's tensor changes; the cache's copy must not
    hit = cache.lookup([1, 2, 3, 4, 9, 9])
    assert hit.length == 3 and hit.logits is None and float(hit.state[0][0].max()) == 1.0
    hit.state[0][0].fill_(-5.0)  # mutating a hit does not touch the cache
    assert float(cache.lookup([1, 2, 3, 7]).state[0][0].max()) == 1.0
    exact = cache.lookup([1, 2, 3, 4, 5])
    assert exact.length == 5 and torch.equal(exact.logits, torch.arange(4.0))
    assert cache.lookup([2, 3]) is None and cache.lookup([1, 2]) is None
    assert (cache.hits, cache.misses) == (3, 2)
    cache.insert([7, 8], s1)
    assert cache.lookup([7, 8]) is None  # a full-length match without logits cannot start decoding
    assert cache.lookup([7, 8], need_logits_at_end=False).length == 2


def test_prefix_cache_lru_by_bytes():
    one = entry_nbytes(fake_state(0.0), None, 2)
    cache = PrefixCache(max_bytes=3 * one)
    for i in range(3):
        cache.insert([i, 100], fake_state(float(i)))
    assert len(cache) == 3 and cache.bytes == 3 * one
    assert cache.lookup([0, 100, 5]) is not None  # touch 0: 1 is now least recently used
    cache.insert([3, 100], fake_state(3.0))
    assert len(cache) == 3 and cache.evictions == 1 and cache.bytes == 3 * one
    assert cache.lookup([1, 100, 5]) is None and cache.lookup([0, 100, 5]) is not None
    assert not cache.insert([9] * 5, fake_state(0.0, layers=10))  # larger than the whole cache
    assert PrefixCache(0).insert([1], fake_state(0.0)) is False


# ----------------------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_with_stops_equals_cut_full_text(include):
    tok = Tokenizer.byte_level()
    rng = random.Random(0)
    alphabet = ["a", "b", "c", " ", "ä", "€", "😀", "\n"]
    for trial in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(text)
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 3))]
        ct = StopText(tok, stops, include_stop=include)
        out = []
        for t in ids:
            ct.add(t)
            out.append(ct.ready())
            if ct.stopped:
                break
        ct.finish()
        out.append(ct.ready(final=True))
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            idx, stop = min(hits)
            want = text[: idx + (len(stop) if include else 0)]
        else:
            want = text
        assert "".join(out) == want, (trial, text, stops)
        assert ct.stopped == bool(hits)
        if not include:  # no piece ever carries (the start of) a stop string that was then cut
            assert all(not any(s in piece for s in stops) for piece in out)


def test_stop_text_holds_back_only_possible_stop_starts():
    """Text is held back exactly while its end could begin a stop string; adding and reading can be
    decoupled (LLM.generate reads once at the end, the server after every token)."""
    tok = Tokenizer.byte_level()
    st = StopText(tok, ["abc", "xyz"])
    got = []
    for ch in "hello ab":
        st.add(tok.encode(ch)[0])
        got.append(st.ready())
    assert "".join(got) == "hello " and st.text == "hello ab"  # "ab" may start "abc"
    st.add(tok.encode("d")[0])
    assert st.ready() == "abd" and not st.stopped  # "abd" cannot
    for ch in "--xy":
        st.add(tok.encode(ch)[0])
    assert st.ready() == "--"
    assert st.add(tok.encode("z")[0]) and st.ready() == "" and st.text == "hello abd--"
    # stop found across many tokens added before any read; searching only the new text's reach
    st = StopText(tok, ["STOP"], include_stop=True)
    for t in tok.encode("aaSTaaSTOPbb"):
        st.add(t)
    assert st.stopped and st.ready() == "aaSTaaSTOP"
    # on a stop, the held-back text before it goes out at once (the server reads no final piece after a stop)
    st = StopText(tok, ["STOP", "Tx"])
    got = []
    for t in tok.encode("aSTxy"):
        st.add(t)
        got.append(st.ready())
    assert st.stopped and "".join(got) == "aS"  # "S" (may start "STOP") was held until "Tx" stopped the text
    # the earliest stop string wins, whatever the order of the list
    st = StopText(tok, ["ab", "b"])
    for t in tok.encode("xab"):
        st.add(t)
    assert st.stopped and st.ready() == "x"
    # no stops: nothing held back; special tokens add no text; finish() takes the decoder's held bytes;
    # no tokenizer: no text, never stopped
    st = StopText(tok)
    st.add(tok.encode("q")[0])
    st.add(tok.encode("r")[0], special=True)
    assert st.ready() == "q"
    st.add(tok.encode("\u00e9")[0])  # the first byte of a two-byte character: held by the decoder
    assert st.ready() == ""
    st.finish()
    assert st.ready(final=True) == "\ufffd"
    none = StopText(None, ["x"])
    assert none.add(7) is False and none.ready(final=True) == "" and not none.stopped
    with pytest.raises(ValueError):
        StopText(tok, [""])


# --------------------------------------------------------------------------------------- chat templates
def test_default_template_turns_are_token_prefixes(tiny_tokenizer_dir):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    ct = ChatTemplate()
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox?"}]
    turn2 = turn1 + [{"role": "assistant", "content": " Jumps over the lazy dog. "},
                     {"role": "user", "content": "And then?"}]
    t1, t2 = ct.render(turn1), ct.render(turn2)
    assert t1 == "System: Be brief.\n\nUser: The quick brown fox?\n\nAssistant:"
    assert t2.startswith(t1 + " Jumps over the lazy dog.\n\nUser: And then?")
    ids1, ids2 = tok.encode(t1), tok.encode(t2)
    assert ids2[: len(ids1)] == ids1


def test_model_dir_templates(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"},
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]"
                                                          "{{ m.content }}{% endfor %}"}]}))
    ct = ChatTemplate.from_model_dir(tmp_path)
    assert ct.render([{"role": "user", "content": "x"}]) == "<s>[user]x"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok")
    ct = ChatTemplate.from_model_dir(tmp_path)
    assert ct.origin.endswith("chat_template.jinja")
    assert ct.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message"):
        ct.render([{"role": "system", "content": "x"}])
    assert ChatTemplate.from_model_dir(tmp_path / "nothing").origin == "default"
    with pytest.raises(ValueError, match="invalid chat template"):
        ChatTemplate("{% for %}")


# ------------------------------------------------------------------------------------ scheduler, no HTTP
def run_requests(sched: Scheduler, reqs: list[GenerationRequest]) -> dict[int, list]:
    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        sched.submit(reqs, asyncio.get_running_loop(), queue)
        events: dict[int, list] = {r.id: [] for r in reqs}
        left = sum(r.n for r in reqs)
        while left:
            req, evs = await asyncio.wait_for(queue.get(), 30)
            events[req.id].extend(evs)
            left -= sum(isinstance(e, FinishEvent) for e in evs)
        return events

    return asyncio.run(main())


def test_scheduler_chunked_prefill_cache_points_and_exactness():
    model = perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2))
    cache = PrefixCache(10**8)
    sched = Scheduler(EngineSlotBackend(model, max_slots=3), eos_token_id=None, cache=cache, prefill_chunk=7)
    sched.start()
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (1, 5, 23, 40, 64)]
        reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=9, temperature=0), cache_points=(len(p) // 2,))
                for p in prompts]
        events = run_requests(sched, reqs)
        for p, r in zip(prompts, reqs):
            toks = [e.token for e in events[r.id] if isinstance(e, TokenEvent)]
            assert toks == generate(model, p, 9)[0].tolist()
            assert events[r.id][0] == PrefillDone(0)
        assert sched.metrics.prefill_tokens._value.get() == sum(map(len, prompts))
        # cache: every prompt end, and the half-way points of those longer than 1 token
        assert all(p in cache for p in prompts) and all(p[: len(p) // 2] in cache for p in prompts if len(p) > 1)
        # an extension of a cached prompt prefills only its new tokens and matches a cold run
        longer = prompts[3] + [5, 6, 7]
        before = sched.metrics.prefill_tokens._value.get()
        req = GenerationRequest(longer, SamplingParams(max_new_tokens=9, temperature=0))
        ev = run_requests(sched, [req])[req.id]
        assert ev[0] == PrefillDone(len(prompts[3]))
        assert sched.metrics.prefill_tokens._value.get() - before == 3
        assert [e.token for e in ev if isinstance(e, TokenEvent)] == generate(model, longer, 9)[0].tolist()
        assert sched.stats()["slots_free"] == 3
    finally:
        sched.shutdown()
    assert not sched.alive


def test_decode_window_leaves_other_live_slots_alone():
    """A decode window over some live slots must not advance the others (bitwise), and its tokens are the
    reference model's greedy continuation."""
    model = perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2))
    be = EngineSlotBackend(model, max_slots=4)
    prompts = ([5, 7, 9], [11, 2], [300, 4, 4, 8])
    logits = []
    for slot, prompt in enumerate(prompts):
        lg, st = be.prefill(prompt, None)
        be.load(slot, st)
        logits.append(lg)
    before = be.read(2)
    first = be.first_tokens([0, 1], torch.stack(logits[:2]))
    toks = torch.cat([first.tokens, be.decode_window([0, 1], 3).tokens], 1)
    for got, want in zip(be.read(2), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for row, prompt in enumerate(prompts[:2]):
        assert toks[row].tolist() == generate(model, prompt, 4)[0].tolist()


def test_warm_prefill_covers_shape_classes_and_touches_no_slot():
    """The start-up prefill warm-up runs on GPU backends only (unless forced), covers lengths on both sides of
    each power of two with and without a start state, and leaves every slot's state as it was."""
    from fastxlstm.serving.slots import warm_prefill

    model = perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2))
    be = EngineSlotBackend(model, max_slots=2)
    be.load(0, be.prefill([5, 6, 7], None)[1])
    before = [t.clone() for layer in be.engine.states for t in layer]
    seen = []
    batched = []
    orig, orig_batch = be.prefill, be.prefill_batch
    be.prefill = lambda toks, st: (seen.append((len(toks), st is not None)), orig(toks, st))[1]
    be.prefill_batch = lambda toks, sts: (batched.append(len(toks[0])), orig_batch(toks, sts))[1]
    assert warm_prefill(be, 300) == 0 and not seen  # CPU: nothing to compile
    n = warm_prefill(be, 300, force=True)
    assert n == len(seen) + len(batched) and batched and max(batched) <= 256
    assert {(15, False), (16, False), (255, False), (256, False), (1, False)} <= set(seen)
    assert any(s for _, s in seen) and max(k for k, _ in seen) <= 300
    assert all(torch.equal(a, b) for a, b in zip(before, (t for layer in be.engine.states for t in layer)))
    # a padding backend (the engine's) also gets the different-length (padding-mask) variants
    eb = EngineSlotBackend(model, max_slots=1)
    calls = []
    orig_engine_batch = eb.prefill_batch
    eb.prefill_batch = lambda toks, sts: (calls.append([len(t) for t in toks]), orig_engine_batch(toks, sts))[1]
    warm_prefill(eb, 20, force=True)
    assert any(len(set(c)) > 1 for c in calls), calls
