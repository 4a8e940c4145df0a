"""Checks run by scripts/train.py before the first step, so that bad data fails fast with file:line."""
from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from nemo_ctcllm.data.manifest import CheckConfig, ManifestError, check_manifest


def frame_shift_seconds(model) -> float:
    """Seconds per encoder output frame (preprocessor hop x encoder subsampling)."""
    hop = float(model.cfg.preprocessor.get("window_stride", 0.01))
    return hop * int(model.cfg.encoder.get("subsampling_factor", 1))


def _manifests(ds_cfg) -> list:
    paths = ds_cfg.get("manifest_filepath") if ds_cfg is not None else None
    if paths is None:
        return []
    if isinstance(paths, (list, ListConfig)):
        return [str(p) for p in paths]
    return [p.strip() for p in str(paths).split(",") if p.strip()]


def check_training_manifests(model, model_cfg: DictConfig) -> None:
    """Refuse to start when a train/validation manifest has unusable lines (all reported at once)."""
    # Duration bounds here catch absurd values only; the datasets' min/max_duration filter as usual.
    check = CheckConfig(min_duration=0.05, max_duration=3600.0, frame_shift=frame_shift_seconds(model),
                        tokenizer=model.tokenizer)
    problems = []
    for key in ("train_ds", "validation_ds"):
        for manifest in _manifests(model_cfg.get(key)):
            problems += check_manifest(manifest, check)
    if problems:
        raise ManifestError(problems)
