"""Inference engine: exact slot-based batching, chunked prefill, CUDA-graph decode and prefill, GPU sampling.

Python API (what most users want)::

    llm = fastxlstm.LLM("NX-AI/xLSTM-7b" | "path/to/dir" | "random:xlstm-7b", device="cuda", dtype=torch.bfloat16)
    out = llm.generate(["Hello", [0, 12, 7]], max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
                       stop=["\\n\\n"], seed=0)        # -> list[GenerationResult(.token_ids, .text, ...)]
    for piece in llm.stream("Once upon a time", max_new_tokens=32): print(piece, end="")
    state = llm.prefill("A long document ...")      # SequenceState: state.save(path) / SequenceState.load(path)
    llm.generate(state, max_new_tokens=16)          # continue it (or llm.generate("more", state=state))

Slot-level API (what a server builds on), ``engine = Engine(model, max_slots=64)``:

* ``allocate_slot() -> int`` / ``free_slot(slot)``; ``free_slots`` (count).
* ``prefill_into_slot(slot, token_ids, state=None, params=None, history=()) -> Tensor [V]``: runs the
  prompt alone (chunked: ``prefill_chunk_size`` tokens at a time, state carried, constant peak
  memory), continuing ``state`` (a ``list[(C, n, m)]`` as from ``get_slot_state``) if given, writes the
  final state into the slot, configures its sampling (``SamplingParams``) and returns float32 next-token
  logits. ``prefill_into_slots(slots, token_ids_list, states=None, params=None, histories=None) ->
  Tensor [n, V]`` does several (prompts of equal length share a forward). On CUDA a prompt batch of at
  most one chunk runs as one CUDA-graph replay of its (batch, length) bucket (``prefill_graphs``,
  ``engine.prefill_graph``): right-padded with neutral gates, which leaves each row's result exact.
* ``configure_slot(slot, params, history=(), counter=0)``: (re)set a slot's sampling parameters.
* ``sample(slots, logits [n, V]) -> Tensor [n]``: first token(s) from prefill logits; the slots start
  decoding with these tokens as their next inputs.
* ``start_from_token(slot, token)``: start decoding from a given (pending) token instead.
* ``decode_step(slots=None, tokens=None, return_outputs=True, return_logits=False) -> DecodeOutput``:
  one token for every given slot (``None``: all slots still running on the device) as one CUDA-graph
  replay per batch bucket; ``tokens=None`` feeds each slot's last sampled token (kept on the GPU).
  ``DecodeOutput(slots, tokens [n], finished [n], logits [n, V] | None)`` holds device tensors: read
  them (``.tolist()``) only when you need them (that is the one host sync, e.g. for streaming).
  Sequences stop on the device at EOS, ``stop_token_ids`` and ``max_new_tokens``; a stopped or
  unlisted slot's state is never modified.
* ``read_tokens(slots) -> list[SlotRead(slot, new_tokens, finished)]``: tokens sampled since the
  last read (one sync for all), for loops that decode several steps between reads.
* ``get_slot_state(slot) -> list[(C, n, m)]`` (copies, float32, leading dim 1) and
  ``set_slot_state(slot, state)``; ``warmup(batch_sizes)`` captures graphs ahead of time.

``EngineSlotBackend(model, max_slots)`` (``fastxlstm.engine.backend``) adapts the Engine to the serving
scheduler's ``SlotBackend`` protocol (``prefill/load/read/release/decode``).

Sampling (``fastxlstm.sampling.SamplingParams``): greedy / temperature / top-k / top-p /
min-p / repetition penalty / per-request seed, all per slot, all on the GPU inside the graph; a seeded
request draws the same tokens whatever batch it runs in (counter-based RNG keyed by seed and step).
"""

from ..sampling import SamplingParams
from .backend import EngineSlotBackend
from .engine import DecodeOutput, Engine, SlotRead
from .llm import LLM, GenerationResult
from .runner import Runner
from .state import SequenceState

__all__ = ["LLM", "DecodeOutput", "Engine", "EngineSlotBackend", "GenerationResult", "Runner", "SamplingParams",
           "SequenceState", "SlotRead"]
