"""Evaluation on the engine: perplexity, an lm-evaluation-harness backend, long-context retrieval (NIAH).

* :mod:`.perplexity`: ``fastxlstm eval perplexity`` (documents with the state carried, or windows).
* :mod:`.lm_eval_backend`: the lm-eval model type ``fastxlstm`` (``pip install fastxlstm[eval]``);
  ``python -m fastxlstm.eval.lm_eval_backend`` is lm-eval's own command line with it registered.
* :mod:`.niah`: RULER-style needle-in-a-haystack prompts, exact-match scoring and the plot.

Modules are imported on use (lm-eval and matplotlib are optional).
"""
