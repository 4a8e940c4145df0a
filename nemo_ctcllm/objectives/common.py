"""Helpers shared by several objectives: masks and masked means over padded batches, and the transcript text.

The ASR vocabulary (SentencePiece) is not the LLM's, so text crosses over as *text*: the batch's target
ids are detokenized with the model's tokenizer and re-tokenized by the consumer.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import torch

from nemo_ctcllm.objectives.base import StepContext


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """lengths [B] -> mask [B, size], True on valid positions (t < length)."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Union[int, Tuple[int, ...]] = -1) -> torch.Tensor:
    """Mean of x over ``dim`` where mask (same shape as x) is True; 0 where nothing is valid."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)



def transcripts(ctx: StepContext) -> List[str]:
    """Ground-truth transcripts of the batch: ``ids_to_text`` of ``targets[b, :target_len[b]]`` per row."""
    tok = ctx.model.tokenizer
    rows = ctx.targets.tolist()  # [B][U]
    return [tok.ids_to_text(row[:n]) for row, n in zip(rows, ctx.target_len.tolist())]


def resolve_llm_hidden_size(model, block, key: str) -> int:
    """The LLM width an objective projects to: ``<key>.llm_hidden_size``, or read from the LLM folder.

    When the block leaves it null, it is read from ``model.llm.checkpoint``'s config.json at the first
    construction and written back into the model config, so a restored ``.nemo`` builds its modules
    without the LLM being present.
    """
    from omegaconf import open_dict

    from nemo_ctcllm.objectives.base import ConfigError

    value = block.llm_hidden_size
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}.llm_hidden_size must be null or an integer >= 1, got {value!r}")
        return value
    llm = model.cfg.get("llm")
    checkpoint = llm.get("checkpoint") if llm is not None else None
    if not checkpoint:
        raise ConfigError(
            f"{key}.llm_hidden_size is null, so it is read from the LLM folder, but model.llm.checkpoint is not "
            f"set: point model.llm.checkpoint to a local Hugging Face LLaMA folder (or set {key}.llm_hidden_size)"
        )
    from nemo_ctcllm.llm.convert import LLMCheckpointError, read_llama_spec

    try:
        hidden = read_llama_spec(checkpoint).hidden_size
    except (LLMCheckpointError, OSError) as e:
        raise ConfigError(f"model.llm.checkpoint: cannot read the LLM config needed by {key}: {e}") from e
    name = key.rsplit(".", 1)[-1]  # model.objectives.<name>
    with open_dict(model.cfg):
        if model.cfg.objectives.get(name) is None:  # a bare `clip:` block
            model.cfg.objectives[name] = {}
        model.cfg.objectives[name].llm_hidden_size = hidden
    return hidden
