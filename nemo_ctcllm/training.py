"""Data checks run by scripts/train.py before the model is built, so that bad data fails fast with file:line.

The top-level ``data_checks`` block of the training config (not part of the model, so not in the ``.nemo``):

    data_checks:
      skip_bad_utterances: false  # false: refuse to start and list every bad line; true: train without them
      check_audio: true           # read each audio header (readable, mono, sample rate, length)
      min_duration: 0.05          # seconds; catches zero and absurd durations (the datasets' own
      max_duration: 3600.0        #   min/max_duration still filter as usual)

With ``skip_bad_utterances`` the usable lines of each manifest are written to
``<log_dir>/checked_manifests/`` (audio paths made absolute) and the config is pointed there; the full
list of skipped lines goes to ``<log_dir>/checked_manifests/skipped_lines.txt`` and the counts to the log.

Semi-supervised training (an objective block with ``unlabelled: true``, e.g. ``llm_pseudo_label``): a train
line without a ``text`` key is an unlabelled utterance and is kept; ``"text": ""`` is still a bad line (the
batch could not tell it from an unlabelled one). Validation manifests always need text.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from omegaconf import DictConfig, ListConfig, open_dict

from nemo_ctcllm.config import ConfigError, check_bool, check_number, merge_block
from nemo_ctcllm.data.manifest import CheckConfig, ManifestError, scan_manifest, write_manifest, write_text_atomic

DATA_CHECK_DEFAULTS = {
    "skip_bad_utterances": False,
    "check_audio": True,
    "min_duration": 0.05,
    "max_duration": 3600.0,
}


def frame_shift_seconds(model_cfg: DictConfig) -> float:
    """Seconds per encoder output frame (preprocessor hop x encoder subsampling)."""
    hop = float(model_cfg.preprocessor.get("window_stride", 0.01))
    return hop * int(model_cfg.encoder.get("subsampling_factor", 1))


def manifest_paths(ds_cfg) -> List[str]:
    """The manifest(s) of a dataset config (a path, a comma-separated string or a list)."""
    paths = ds_cfg.get("manifest_filepath") if ds_cfg is not None else None
    if paths is None:
        return []
    if isinstance(paths, (list, ListConfig)):
        return [str(p) for p in paths]
    return [p.strip() for p in str(paths).split(",") if p.strip()]


def read_data_checks(cfg: Optional[DictConfig]) -> DictConfig:
    """The ``data_checks`` block merged over its defaults; unknown keys and bad values name the key."""
    merged = merge_block(cfg, DATA_CHECK_DEFAULTS, "data_checks")
    for key in ("skip_bad_utterances", "check_audio"):
        check_bool(merged[key], f"data_checks.{key}")
    check_number(merged.min_duration, "data_checks.min_duration", 0.0, 1e6)
    check_number(merged.max_duration, "data_checks.max_duration", merged.min_duration, 1e6, low_open=True)
    return merged


def uses_unlabelled(model_cfg: DictConfig) -> bool:
    """Whether an enabled objective trains on unlabelled rows (its block has ``unlabelled: true``)."""
    objectives = model_cfg.get("objectives") or {}
    return any(
        block is not None and block.get("unlabelled", False) is True and block.get("enabled", True)
        for block in objectives.values()
    )


def load_tokenizer(model_cfg: DictConfig):
    """The model's SentencePiece tokenizer, loaded from ``model.tokenizer.dir`` without building the model."""
    from nemo.collections.common.tokenizers import SentencePieceTokenizer

    tok_cfg = model_cfg.get("tokenizer")
    if tok_cfg is None or tok_cfg.get("type", "bpe") != "bpe":
        return None  # wpe tokenizers: text checks other than 'empty' are skipped
    path = os.path.join(str(tok_cfg.dir), "tokenizer.model")
    if not os.path.isfile(path):
        raise ConfigError(f"model.tokenizer.dir: no tokenizer.model in {tok_cfg.dir}")
    return SentencePieceTokenizer(path)


def check_training_data(cfg: DictConfig, log_dir: Optional[str] = None) -> Dict[str, int]:
    """Check the train and validation manifests of the training config ``cfg`` before the model exists.

    Refuses to start (ManifestError listing every bad line) unless ``data_checks.skip_bad_utterances``;
    then rewrites ``cfg.model.<split>.manifest_filepath`` to checked copies under ``log_dir``.
    Returns counts: {'<split>_bad': n, '<split>_kept': n, 'train_unlabelled': n}.
    """
    from nemo.utils import logging

    checks = read_data_checks(cfg.get("data_checks"))
    model_cfg = cfg.model
    base = CheckConfig(
        min_duration=checks.min_duration,
        max_duration=checks.max_duration,
        check_audio=checks.check_audio,
        frame_shift=frame_shift_seconds(model_cfg),
        tokenizer=load_tokenizer(model_cfg),
        sample_rate=model_cfg.get("sample_rate"),
    )
    semi = uses_unlabelled(model_cfg)
    counts: Dict[str, int] = {}
    problems: List[str] = []
    rewritten: Dict[str, List[str]] = {}
    for split in ("train_ds", "validation_ds"):
        check = CheckConfig(**{**base.__dict__, "require_text": not (split == "train_ds" and semi)})
        paths = []
        for manifest in manifest_paths(model_cfg.get(split)):
            report = scan_manifest(manifest, check)
            problems += report.problems
            counts[f"{split}_bad"] = counts.get(f"{split}_bad", 0) + len(report.problems)
            counts[f"{split}_kept"] = counts.get(f"{split}_kept", 0) + len(report.good)
            if split == "train_ds":
                counts["train_unlabelled"] = counts.get("train_unlabelled", 0) + report.unlabelled
            if report.problems and checks.skip_bad_utterances:
                if not report.good:
                    raise ManifestError(report.problems, hint=f"\nno usable line is left in {manifest}")
                name = f"{split}_{len(paths)}_{os.path.basename(manifest)}"
                manifest = write_manifest(report.good, manifest, os.path.join(_out_dir(log_dir), name))
            paths.append(manifest)
        rewritten[split] = paths
    if semi and counts.get("train_ds_kept", 0) and counts.get("train_unlabelled") == counts.get("train_ds_kept"):
        logging.warning("every training line is unlabelled: only the objectives with unlabelled: true will train")
    if problems and not checks.skip_bad_utterances:
        raise ManifestError(
            problems, hint="\nfix these lines, or set data_checks.skip_bad_utterances=true to train without them"
        )
    if problems:
        report_path = os.path.join(_out_dir(log_dir), "skipped_lines.txt")
        write_text_atomic(report_path, "\n".join(problems) + "\n")
        logging.warning(
            f"data_checks.skip_bad_utterances: skipping {len(problems)} bad manifest line(s) "
            f"(train {counts.get('train_ds_bad', 0)}, validation {counts.get('validation_ds_bad', 0)}); "
            f"first: {problems[0]}; all listed in {report_path}"
        )
        with open_dict(model_cfg):
            for split, paths in rewritten.items():
                if paths:
                    model_cfg[split].manifest_filepath = paths[0] if len(paths) == 1 else paths
    return counts


def _out_dir(log_dir: Optional[str]) -> str:
    out = os.path.join(log_dir or ".", "checked_manifests")
    os.makedirs(out, exist_ok=True)
    return out
