"""Configuration checking, in one place: :class:`ConfigError`, the ``check_*`` helpers, :func:`merge_block`,
and the blocks that several parts of the package read (``model.llm``).

Every message names the full config key (``model.objectives.clip.dim must be ...``) and the allowed values.
This module imports nothing of the package, so every layer (data, llm, objectives, models, scripts) can use it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad value in the model config; the message names the full key."""


def merge_block(block, defaults: Mapping[str, object], key: str) -> DictConfig:
    """A config block (mapping or None) merged over ``defaults``; unknown keys are a ConfigError naming ``key``."""
    user = OmegaConf.to_container(block, resolve=True) if block is not None else {}
    if not isinstance(user, dict):
        raise ConfigError(f"{key} must be a mapping, got {user!r}")
    unknown = sorted(set(user) - set(defaults))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; allowed keys: {sorted(defaults)}")
    return OmegaConf.create({**defaults, **user})


def check_weight(value, key: str, upper: float = 100.0) -> float:
    """A loss weight must be a finite number in [0, upper]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number in [0, {upper}], got {value!r}")
    if not 0.0 <= value <= upper:
        raise ConfigError(f"{key} must be in [0, {upper}], got {value}")
    return float(value)


def check_int(value, key: str, low: int, high: Optional[int] = None) -> int:
    """An integer in [low, high] (no upper bound when high is None); bools are rejected."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    return value


def check_number(value, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in the interval [low, high] (ends open where asked)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{key} must be a finite number in {interval}, got {value!r}")
    return float(value)


def check_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_str(value, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def check_choice(value, key: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- model.llm
# cache_dir: ignored (the host slices the safetensors files directly); accepted so older configs / .nemo files load
LLM_DEFAULTS = {"checkpoint": None, "tensor_model_parallel_size": 1, "activation_recompute": False, "cache_dir": None}


def read_llm_block(block) -> dict:
    """``model.llm`` merged over :data:`LLM_DEFAULTS` and validated (the one place that checks it)."""
    merged = merge_block(block, LLM_DEFAULTS, "model.llm")
    check_int(merged.tensor_model_parallel_size, "model.llm.tensor_model_parallel_size", 1)
    check_bool(merged.activation_recompute, "model.llm.activation_recompute")
    for name in ("checkpoint", "cache_dir"):
        if merged[name] is not None:
            check_str(merged[name], f"model.llm.{name}")
    return dict(merged)


# ---------------------------------------------------------------------------------------------- declared blocks
def read_dataclass(block, schema, key: str):
    """A config block read into the dataclass ``schema``: its fields are the allowed keys and their defaults
    (an unknown key is a ConfigError naming ``key``); the values are not checked here (``schema.check`` does)."""
    defaults = {f.name: getattr(schema(), f.name) for f in dataclasses.fields(schema)}
    merged = OmegaConf.to_container(merge_block(block, defaults, key), resolve=True)
    return schema(**merged)
