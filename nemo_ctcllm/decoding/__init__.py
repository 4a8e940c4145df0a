"""CTC N-best search (used by the LLM objectives in training) and decode-time N-best LLM rescoring
(:mod:`nemo_ctcllm.decoding.llm_rerank`, ``scripts/evaluate.py --llm``); greedy decoding stays NeMo's."""

from nemo_ctcllm.decoding.nbest import NBest, collapse_paths, ctc_prefix_beam_search, sequence_log_probs  # noqa: F401
