"""The lm-eval backend ``fastxlstm`` against lm-eval's own ``hf`` backend (transformers' xLSTMForCausalLM
loading the same directory), offline, on a local multiple-choice task; generate_until against LLM.generate."""

from __future__ import annotations

import json
import shutil
from unittest import mock

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from fastxlstm.config import XLSTMConfig  # noqa: E402
from fastxlstm.eval import lm_eval_backend  # noqa: E402
from fastxlstm.eval.lm_eval_backend import FastXLSTMLM  # noqa: E402

from .helpers import perturbed_model  # noqa: E402

# head dims 64/128: transformers' cache (used by lm-eval's hf backend) rounds smaller ones up and breaks
CFG = XLSTMConfig(vocab_size=320, embedding_dim=256, num_blocks=2, num_heads=2, chunk_size=16)
QUESTIONS = [("The quick brown", [" fox", " dog", " lazy dog"], 0),
             ("xLSTM is a recurrent language", [" model", " dog", " fox jumps"], 0),
             ("Ein Bär läuft über die", [" Brücke", " Straße", " schön"], 1),
             ("The lazy dog", [" sleeps.", " jumps over the fox.", " is"], 2)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir, request):
    mp = pytest.MonkeyPatch()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(var, "1")
    request.addfinalizer(mp.undo)
    root = tmp_path_factory.mktemp("lmeval")
    perturbed_model(CFG).save_pretrained(str(root / "m"))
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", root / "m" / "tokenizer.json")
    (root / "m" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|eos|>",
        "pad_token": "<|padding|>"}))
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    hf = get_model("hf")(pretrained=str(root / "m"), dtype="float32", device="cpu", batch_size=3)
    ours = FastXLSTMLM(pretrained=str(root / "m"), dtype="float32", device="cpu", batch_size=2)
    return root, hf, ours


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_hf_backend_and_contexts_are_shared(setup):
    _, hf, ours = setup
    reqs = [(q, c) for q, choices, _ in QUESTIONS for c in choices] + [("", " The quick brown fox"),
                                                                       ("The lazy dog ", "sleeps")]
    want = hf.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    prefilled = []
    forward = ours.runner.forward_tokens

    def counting(ids, state=None, lengths=None):
        prefilled.extend(lengths)
        return forward(ids, state, lengths)

    with mock.patch.object(ours.runner, "forward_tokens", counting):
        got = ours.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-4)
        assert g_greedy == w_greedy
    # each context prefilled once (all but its last token), however many continuations it has
    contexts = {tuple(ours.tok_encode(q.rstrip())[:-1]) for q, _ in reqs if q}  # trailing spaces move
    assert sorted(prefilled) == sorted(len(c) for c in contexts if c)

    # token-level requests whose continuation is (all / only partly) the model's greedy output
    ctx = ours.tok_encode("The quick brown")
    (gen,) = ours.llm.generate(ctx, max_new_tokens=3, ignore_eos=True)
    g = gen.token_ids
    other = next(t for t in range(3, 300) if t != g[1])
    tok_reqs = [(("", ""), ctx, g), (("", ""), ctx, [g[0], other]), (("", ""), ctx, g[:1])]
    flags = [r[1] for r in ours._loglikelihood_tokens(tok_reqs, disable_tqdm=True)]
    assert flags == [True, False, True] == [r[1] for r in hf._loglikelihood_tokens(tok_reqs, disable_tqdm=True)]

    docs = [q + "".join(c) for q, c, _ in QUESTIONS]
    want_rolling = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]),
                                            disable_tqdm=True)
    got_rolling = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]),
                                             disable_tqdm=True)
    assert got_rolling == pytest.approx(want_rolling, rel=1e-4)


def _samples(out_dir):
    (path,) = out_dir.rglob("samples_tiny_mc_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["doc_id"]: [float(x[0]) for x in r["filtered_resps"]] for r in rows}


def test_task_through_the_cli_equals_hf_backend(setup, tmp_path):
    """`python -m fastxlstm.eval.lm_eval_backend --model fastxlstm ...` (lm-eval's CLI) and `--model hf`."""
    root, _, _ = setup
    results = {}
    for name in ("fastxlstm", "hf"):
        lm_eval_backend.main(["--model", name, "--model_args", f"pretrained={root / 'm'},dtype=float32",
                              "--tasks", "tiny_mc", "--include_path", str(root / "tasks"), "--device", "cpu",
                              "--batch_size", "2", "--log_samples", "--output_path", str(tmp_path / name)])
        (res,) = (tmp_path / name).rglob("results_*.json")
        results[name] = (json.loads(res.read_text())["results"]["tiny_mc"]["acc,none"], _samples(tmp_path / name))
    (acc, per_item), (hf_acc, hf_items) = results["fastxlstm"], results["hf"]
    assert acc == hf_acc
    assert per_item.keys() == hf_items.keys() == set(range(len(QUESTIONS)))
    for doc in per_item:
        assert per_item[doc] == pytest.approx(hf_items[doc], rel=1e-4, abs=1e-4)


def test_generate_until_equals_llm_generate(setup):
    _, _, ours = setup
    prompts = ["The quick brown", "xLSTM is", "Ein Bär"]
    free = [r.text for r in ours.llm.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    stops = [text[4:6] for text in free]  # strings the model does produce
    assert all(len(s) == 2 for s in stops), free
    reqs = [(p, {"until": [s], "max_gen_toks": 12}) for p, s in zip(prompts, stops)]
    reqs.append((prompts[0], {"max_gen_toks": 5}))
    got = ours.generate_until(_instances("generate_until", reqs), disable_tqdm=True)
    for (p, kw), text, unstopped in zip(reqs, got, free + [None]):
        (want,) = ours.llm.generate(p, max_new_tokens=kw["max_gen_toks"], temperature=0.0, stop=kw.get("until"))
        assert text == want.text
        if unstopped is not None:  # cut before the first occurrence of the stop string
            assert text == unstopped[:unstopped.index(kw["until"][0])]
    # the same greedy tokens as a plain token-by-token argmax of the model (no stop strings)
    ids = ours.tok_encode(prompts[0])
    with torch.no_grad():
        for _ in range(5):
            logits, _ = ours.llm.model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert got[3] == ours.tok_decode(ids[-5:])


def test_bad_model_args_are_named(setup):
    root, _, _ = setup
    with pytest.raises(ValueError, match="unknown model_args for fastxlstm: colour"):
        FastXLSTMLM(pretrained=str(root / "m"), colour="red")
    with pytest.raises(ValueError, match="unknown dtype .int8."):
        FastXLSTMLM(pretrained=str(root / "m"), dtype="int8")
    with pytest.raises(ValueError, match="unknown quantization"):
        FastXLSTMLM(pretrained=str(root / "m"), quantization="int4")


def test_local_completions_through_the_server_equal_hf_backend(setup):
    """lm-eval's ``local-completions`` (``echo`` + ``logprobs``, the remote tokenizer through ``/tokenizer_info``
    and ``/tokenize``) against the real server over the same directory gives the ``hf`` backend's log-likelihoods
    and greedy flags (prompts scored on the device as they are prefilled, in pieces: ``prefill_chunk=8``)."""
    from fastxlstm.checkpoint import load
    from fastxlstm.serving.app import build_app
    from fastxlstm.serving.runtime import ServeConfig
    from fastxlstm.serving.testing import ServerThread
    from fastxlstm.tokenizer import Tokenizer

    root, hf, _ = setup
    reqs = [(q, c) for q, choices, _ in QUESTIONS for c in choices] + [("The lazy dog ", "sleeps")]
    want = hf.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    app = build_app(load(root / "m"), Tokenizer.from_dir(root / "m"),
                    ServeConfig(model_name="tiny", max_slots=4, prefill_chunk=8))
    with ServerThread(app) as srv:
        lm = get_model("local-completions")(model="tiny", base_url=srv.base_url + "/v1/completions",
                                            tokenizer_backend="auto", batch_size=1, max_retries=1)
        assert lm.tokenizer_backend == "remote"  # it found /tokenizer_info and /tokenize
        got = lm.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    assert [g for _, g in got] == [w for _, w in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], rel=1e-4, abs=1e-4)
