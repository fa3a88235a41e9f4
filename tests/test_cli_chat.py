"""``fastxlstm chat``: each turn continues the state of the previous reply (only the new turn's tokens are
prefilled), with the server's chat template; the replies equal a from-scratch generation over the same
tokens; /reset and /exit; the REPL driven through stdin."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fastxlstm.chat import ChatSession
from fastxlstm.cli import app
from fastxlstm.engine import LLM
from fastxlstm.sampling import SamplingParams
from fastxlstm.serving.chat_template import ChatTemplate

TURNS = ["The quick brown fox?", "Ein Bär läuft über die Brücke", "xLSTM is a recurrent model."]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), device="cpu", max_slots=2)


def spy_prefills(llm, fed: list[list[int]]):
    """Record the token ids of every prefill the engine runs; returns the undo."""
    eng = llm.engine
    orig = eng.prefill_into_slots

    def spy(slots, ids, *a, **k):
        fed.extend(list(x) for x in ids)
        return orig(slots, ids, *a, **k)

    eng.prefill_into_slots = spy
    return lambda: setattr(eng, "prefill_into_slots", orig)


def test_turns_continue_the_state_and_equal_a_full_prefill(llm):
    """Turns 2 and 3 prefill only their own tokens after the previous reply's state (the pending last token
    of that reply, then the new turn's text as the server's template writes it), and each reply equals greedy
    generation from scratch over all the tokens the model has seen (the state continuation is exact)."""
    template = ChatTemplate()  # the server's default template (the model ships none)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    session = ChatSession(llm, template, params, system="Thou art a player.")
    fed: list[list[int]] = []
    restore = spy_prefills(llm, fed)
    try:
        replies, seen = [], []
        for turn in TURNS:
            seen.append(list(session.state.token_ids) if session.state is not None else [])
            replies.append("".join(session.send(turn)))
    finally:
        restore()
    assert len(fed) == 3 and all(replies) and len(set(replies)) == 3
    assert fed[0] == llm.encode(template.render(session.messages[:2], add_generation_prompt=True))
    for k in (1, 2):
        pending, increment = fed[k][0], fed[k][1:]
        assert pending == seen[k][-1]  # the previous reply's last token, then only the new turn
        assert len(increment) < len(seen[k])  # less than the history: it is not prefilled again
        before, text = llm.tokenizer.decode(seen[k]), llm.tokenizer.decode(seen[k] + increment)
        # the reply as generated, then the template's next turn (less newlines the reply already ended in)
        assert text.startswith(before) and text.endswith(f"\n\nUser: {TURNS[k]}\n\nAssistant:"), text
        assert text[len(before):].lstrip("\n") == f"User: {TURNS[k]}\n\nAssistant:"
        scratch = llm.generate(seen[k] + increment, max_new_tokens=12)[0]
        assert scratch.text == replies[k]


def test_turn_prompt_paths(llm):
    """How a turn starts: the state's tokens are a token prefix of the rendered conversation (the rest is
    fed: the server's tokens); the reply ended in EOS (the template's text after the reply); in a stop string
    (that text less the stop string); the template renders something else (a fresh state, everything)."""
    tok, template = llm.tokenizer, ChatTemplate()
    session = ChatSession(llm, template, SamplingParams(max_new_tokens=2))
    session.messages = [{"role": "user", "content": "The quick fox"}, {"role": "assistant", "content": "jumps"}]
    nxt = [*session.messages, {"role": "user", "content": "over the dog"}]
    full = tok.encode(template.render(nxt))
    before = tok.encode(template.render(session.messages, add_generation_prompt=False, continue_final_message=True))
    assert full[:len(before)] == before  # (the default template's promise)

    session.state = llm.prefill(before)
    ids, state = session._turn_prompt(nxt)
    assert state is session.state and ids == full[len(before):]

    session.state = llm.prefill(before + [tok.eos_token_id])
    ids, state = session._turn_prompt(nxt)
    assert state is session.state and ids == tok.encode("\n\nUser: over the dog\n\nAssistant:", add_bos=False)

    session.state, session._tail = llm.prefill(before + tok.encode("\n\nUser:")), "\n\nUser:"
    ids, state = session._turn_prompt(nxt)
    assert state is session.state and ids == tok.encode(" over the dog\n\nAssistant:", add_bos=False)

    session.state, session._tail = llm.prefill(tok.encode("something else")), ""
    other = [{"role": "user", "content": "A slow fox"}, *nxt[1:]]  # a history that renders differently
    ids, state = session._turn_prompt(other)
    assert state is None and ids == tok.encode(template.render(other))


def test_repl_through_stdin(llm, model_dir):
    """``fastxlstm chat MODEL`` with piped stdin: streamed replies (one line per turn, as the session's),
    /reset starts over (the same first reply again), /exit stops reading."""
    session = ChatSession(llm, ChatTemplate(), SamplingParams(max_new_tokens=8, temperature=0.0))
    first = "".join(session.send(TURNS[0]))
    second = "".join(session.send(TURNS[1]))
    stdin = f"{TURNS[0]}\n{TURNS[1]}\n/reset\n{TURNS[0]}\n/exit\n{TURNS[2]}\n"
    result = CliRunner().invoke(app, ["chat", str(model_dir), "--max-new-tokens", "8", "--temperature", "0",
                                      "--device", "cpu"], input=stdin)
    assert result.exit_code == 0, result.output
    want = f"{first}\n{second}\n(conversation reset)\n{first}\n"
    assert result.stdout == want


def test_repl_streams_pieces(llm):
    """The reply reaches the output piece by piece while it is generated (one write per new text piece)."""
    from fastxlstm.chat import repl

    class Out:
        def __init__(self):
            self.writes: list[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            pass

    session = ChatSession(llm, ChatTemplate(), SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
    out = Out()
    repl(session, iter([TURNS[0] + "\n"]), out)
    reply = session.messages[-1]["content"]
    assert "".join(out.writes) == reply + "\n" and len(out.writes) > 3


def turn_taker(tok) -> tuple[LLM, str]:
    """A model that answers `` Go.`` and then writes the next user turn itself, forever (``\\nUser: Go.\\nUser:
    ...``): a bigram table in the weights (the blocks' outputs zeroed, so the logits depend on the current token
    only: each token of the cycle predicts the next, every other token the cycle's first)."""
    import torch

    from fastxlstm.config import XLSTMConfig
    from fastxlstm.model import XLSTMForCausalLM

    text = " Go.\nUser:"
    cycle = tok.encode(text, add_bos=False)
    assert len(set(cycle)) == len(cycle) and tok.decode(cycle) == text  # a bigram table can hold it
    torch.manual_seed(0)
    model = XLSTMForCausalLM(XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=1, num_heads=2))
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.mlstm_layer.out_proj.weight.zero_()
            block.ffn.proj_down.weight.zero_()
        emb, head = model.backbone.embeddings.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # every token: direction 0, which predicts the cycle's first token
        head.zero_()
        head[cycle[0], 0] = 1.0
        for i, t in enumerate(cycle):  # token i of the cycle: direction i + 1, which predicts token i + 1
            emb[t] = 0.0
            emb[t, i + 1] = 1.0
            head[cycle[(i + 1) % len(cycle)], i + 1] = 1.0
        model.backbone.out_norm.weight.fill_(1.0)
    return LLM(model.eval(), tok, device="cpu", max_slots=1), text


def test_default_template_stops_at_the_next_user_turn(llm):
    """On the default template a reply ends where the model starts the next user turn (``\\nUser:``, the stop the
    server's chat answers have), the user's own stop strings still count; a template without that stop lets
    the same model run on."""
    taker, text = turn_taker(llm.tokenizer)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    runs_on = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}Assistant:")
    assert runs_on.stop == ()
    free = "".join(ChatSession(taker, runs_on, params).send("Shall we?"))
    assert free.startswith(text + " Go.")  # the model writes the user's turn itself
    session = ChatSession(taker, ChatTemplate(), params)
    assert session.params.stop == ["\nUser:"] and params.stop == []
    assert "".join(session.send("Shall we?")) == " Go."
    assert session.messages[-1] == {"role": "assistant", "content": " Go."}
    # the next turn continues from the state, which has seen the stop string: only the rest of the turn is fed
    assert "".join(session.send("And now?")) == " Go."
    assert session.prefilled[-1] == len(llm.tokenizer.encode(" And now?\n\nAssistant:", add_bos=False))
    mine = ChatSession(taker, ChatTemplate(), SamplingParams(max_new_tokens=24, temperature=0.0, stop=["o."]))
    assert mine.params.stop == ["o.", "\nUser:"] and "".join(mine.send("Shall we?")) == " G"
