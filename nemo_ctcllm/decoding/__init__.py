"""Decoding utilities used *during training* (the model's inference decoding stays NeMo's)."""
from nemo_ctcllm.decoding.nbest import NBest, collapse_paths, ctc_prefix_beam_search, sequence_log_probs  # noqa: F401
