"""Checks of block values that several objectives share (encoder blocks and their weights, the LLM)."""

from __future__ import annotations

from typing import List, Optional

from nemo_ctcllm.config import ConfigError, check_weight
from nemo_ctcllm.objectives.base import ObjectiveEnv


def encoder_depth(env: ObjectiveEnv, key: str) -> int:
    """Number of encoder blocks (the encoder's ``layers``); a ConfigError naming ``key`` when it has none."""
    layers = getattr(env.encoder, "layers", None)
    if layers is None:
        raise ConfigError(f"{key}: the encoder {type(env.encoder).__name__} has no `layers` to attach heads to")
    return len(layers)


def check_blocks(blocks, depth: int, key: str, allow_last: bool) -> List[int]:
    """Blocks are distinct integers in [1, depth-1] (or [1, depth] when the last block is allowed)."""
    top = depth if allow_last else depth - 1
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ConfigError(f"{key} must be a non-empty list of encoder blocks in [1, {top}], got {blocks!r}")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= top:
            raise ConfigError(
                f"{key}: block {b!r} is outside the encoder; allowed: integers in [1, {top}] "
                f"(the encoder has {depth} blocks{'' if allow_last else '; the last one is the final CTC head'})"
            )
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{key}: blocks must be distinct, got {list(blocks)}")
    return list(blocks)


def check_block_weights(weights, blocks: List[int], key: str) -> List[float]:
    """One weight in [0, 1] per block."""
    if not isinstance(weights, (list, tuple)):
        raise ConfigError(f"{key} must be a list of weights in [0, 1], one per block, got {weights!r}")
    if len(weights) != len(blocks):
        raise ConfigError(f"{key} must have one weight per block: {len(blocks)} blocks, {len(weights)} weights")
    return [check_weight(w, f"{key}[{i}]", upper=1.0) for i, w in enumerate(weights)]


def check_llm_hidden_size(value: Optional[int], key: str) -> None:
    """``llm_hidden_size``: null (read from the LLM folder at construction) or the LLM's width."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key} must be null or an integer >= 1, got {value!r}")


def require_llm(env: ObjectiveEnv, key: str) -> None:
    """An LLM-scoring objective needs ``model.llm.checkpoint`` (checked at construction, loaded lazily)."""
    if not env.llm_checkpoint:
        raise ConfigError(
            f"{key} scores hypotheses with the LLM, but model.llm.checkpoint is not set: point it to a local "
            "Hugging Face LLaMA folder (scripts/prepare_llm.py prepares the demo's SmolLM2)"
        )
