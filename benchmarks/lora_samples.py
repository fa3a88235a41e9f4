"""README's LoRA before/after samples: held-out (val split) instruction prompts, greedy, base vs base + adapter.

Run from the repository root after configs/lora-shakespeare-cpu.yaml: ``python benchmarks/lora_samples.py``.
"""

import json

from fastxlstm import LLM
from fastxlstm.serving.chat_template import ChatTemplate
from fastxlstm.tokenizer import Tokenizer
from fastxlstm.training.chat_data import load_documents
from fastxlstm.training.data import TokenShards

MODEL = "models/xlstm-shakespeare-10m"
data = TokenShards(".cache/train_data/shakespeare-instruct")
docs = load_documents(data, "val")
tok = Tokenizer.from_dir(MODEL)
val = set()
for i in range(len(docs)):
    val.add(tok.decode(docs.document(i)[0].tolist()))
recs = [json.loads(line) for line in open("data/instructions/shakespeare-instruct.jsonl")]
held = [r for r in recs if any(r["prompt"] in v and r["completion"] in v for v in val)]
picked = []
for kind in ("Who speaks", "Which play", "Give the line"):
    picked += [r for r in held if r["prompt"].startswith(kind)][:2]
tpl = ChatTemplate.from_model_dir(MODEL)
prompts = [tpl.render([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True) for r in picked]
base = LLM(MODEL, device="cpu").generate(prompts, max_new_tokens=20, temperature=0.0, stop=["\n"])
tuned = LLM(MODEL, adapter="runs/lora-shakespeare-cpu/adapter", device="cpu").generate(
    prompts, max_new_tokens=20, temperature=0.0, stop=["\n"])
print(len(held), "held-out records")
for r, b, t in zip(picked, base, tuned):
    print(json.dumps({"prompt": r["prompt"], "expected": r["completion"], "base": b.text, "lora": t.text}))
