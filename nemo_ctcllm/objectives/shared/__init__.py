"""Pieces that several objectives share: the soft-text bridge (:mod:`.bridge`), the N-best with LLM scores
(:mod:`.hypotheses`), prefix building for the frozen LLM (:mod:`.prefix`), the two-tower InfoNCE
(:mod:`.contrastive`), block checks (:mod:`.checks`) and masked tensor helpers (:mod:`.tensors`).

Objective modules import from here and from :mod:`nemo_ctcllm.objectives.base`, never from each other; nothing
here imports an objective module (``tests/test_layers.py`` checks both).
"""
