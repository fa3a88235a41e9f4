"""Per-token fast paths of the server: pre-serialised SSE chunks and the scheduler's stream interval."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine.backend import EngineSlotBackend
from fastxlstm.sampling import SamplingParams
from fastxlstm.serving.requests import FinishEvent, GenerationRequest, PrefillDone, TokenEvent
from fastxlstm.serving.scheduler import Scheduler
from fastxlstm.serving.sse import SSEChunks, sse_event

from .helpers import greedy_reference as generate
from .helpers import perturbed_model


@pytest.mark.parametrize("text", ["", "plain", 'quo"te \\ back', "new\nline\t\u0001", "ünï 中文 🙂", "\ud800"[:0]])
@pytest.mark.parametrize("usage", [None, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}])
def test_sse_chunks_equal_full_serialisation(text, usage):
    head = {"id": "cmpl-\"x\"", "object": "text_completion", "created": 1700000000, "model": "m/ü"}
    lp = {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [None], "text_offset": [0]}
    sse, field = SSEChunks(head), SSEChunks.field
    for logprobs, reason in ((None, None), (lp, "stop")):
        fast = sse.chunk(3, field("text", text) + field("logprobs", logprobs) + field("finish_reason", reason), usage)
        choice = {"index": 3, "text": text, "logprobs": logprobs, "finish_reason": reason}
        slow = sse_event({**head, "choices": [choice], "usage": usage})
        assert fast == slow
        assert json.loads(fast[len("data: "):])["choices"][0]["text"] == text
    chat = sse.chunk(0, field("delta", {"content": text}) + field("logprobs", None) + field("finish_reason", None))
    assert chat == sse_event({**head, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                                   "finish_reason": None}], "usage": None})


def deliveries(sched: Scheduler, reqs: list[GenerationRequest]) -> dict[int, list[list]]:
    """Every hand-over of each request's events, unmerged."""
    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        sched.submit(reqs, asyncio.get_running_loop(), queue)
        out: dict[int, list[list]] = {r.id: [] for r in reqs}
        left = sum(r.n for r in reqs)
        while left:
            req, evs = await asyncio.wait_for(queue.get(), 30)
            out[req.id].append(list(evs))
            left -= sum(isinstance(e, FinishEvent) for e in evs)
        return out

    return asyncio.run(main())


def test_stream_interval_batches_tokens_but_stops_exactly():
    model = perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2))
    prompts = [[5, 17, 99, 3], [250, 1, 2]]
    refs = [generate(model, p, 24)[0].tolist() for p in prompts]
    stop_tok = refs[1][6]
    cut = refs[1].index(stop_tok) + 1  # generation ends on (and includes) the first occurrence of the stop token
    # a slow "engine": each step waits, so one 60 ms interval spans several steps
    slots = EngineSlotBackend(model, max_slots=4)
    decode = slots.decode_window

    def slow_decode(s, steps, logprobs=False):
        import time
        time.sleep(0.01 * steps)
        return decode(s, steps, logprobs)

    slots.decode_window = slow_decode
    sched = Scheduler(slots, eos_token_id=None, stream_interval=0.06)
    sched.start()
    try:
        reqs = [GenerationRequest(prompts[0], SamplingParams(max_new_tokens=24, temperature=0)),
                GenerationRequest(prompts[1], SamplingParams(max_new_tokens=24, temperature=0,
                                                             stop_token_ids=(stop_tok,)))]
        got = deliveries(sched, reqs)
        for req, want, reason in ((reqs[0], refs[0], "length"), (reqs[1], refs[1][:cut], "stop")):
            batches = got[req.id]
            flat = [e for b in batches for e in b]
            assert [e.token for e in flat if isinstance(e, TokenEvent)] == want
            # first token goes out at once with PrefillDone; the finish comes last, nothing after it
            assert isinstance(batches[0][0], PrefillDone) and sum(isinstance(e, TokenEvent) for e in batches[0]) == 1
            assert flat[-1] == FinishEvent(0, reason) and sum(isinstance(e, FinishEvent) for e in flat) == 1
            if len(want) > 8:  # tokens were handed over several at a time
                assert len(batches) < len(want) - 2
        assert sched.stats()["slots_free"] == 4
    finally:
        sched.shutdown()
    with pytest.raises(ValueError, match="stream_interval"):
        Scheduler(slots, eos_token_id=None, stream_interval=-1)
