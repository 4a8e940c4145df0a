"""Export a trained EncDecCTCLLMModelBPE for inference.

Every training-only module (intermediate heads, connectors, projections, the LLM — which is never in the
model's state anyway) is dropped. If nothing left changes the forward pass, the result *is* a plain NeMo
``EncDecCTCModelBPE`` (its config's ``target`` names NeMo's class, its state has exactly NeMo's keys), so it
restores and transcribes without this package. With self-conditioned InterCTC the conditioning heads are
part of inference: the model stays an EncDecCTCLLMModelBPE keeping only those heads.
"""

from __future__ import annotations

import os
import tempfile

import torch
from omegaconf import open_dict

PLAIN_TARGET = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"


def strip_for_inference(model) -> bool:
    """Drop training-only objectives in place; returns True if the model is now a plain EncDecCTCModelBPE."""
    keep = set(model.inference_terms())
    model.objectives = torch.nn.ModuleDict({n: t for n, t in model.objectives.items() if n in keep})
    with open_dict(model.cfg):
        objectives = model.cfg.get("objectives") or {}
        if keep:
            # only the self-conditioned interctc block (and the final head) are needed to rebuild the model
            model.cfg.objectives = {k: v for k, v in objectives.items() if k in ("ctc_final", "interctc")}
        else:
            model.cfg.pop("objectives", None)
            model.cfg.target = PLAIN_TARGET
        model.cfg.pop("llm", None)
    model._capture = []
    return not keep


def publish(tmp: str, path: str) -> None:
    """Rename a finished temporary file onto ``path`` with the permissions a plain write would have given
    (mkstemp creates files readable by their owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_save(model, path: str) -> str:
    """``model.save_to`` through a temporary file in the same folder, then rename: never half-written.
    (EncDecCTCLLMModelBPE.save_to is atomic itself; a stripped plain EncDecCTCModelBPE is not.)"""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".nemo.tmp", dir=folder)
    os.close(fd)
    try:
        model.save_to(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def export_for_inference(src: str, dst: str) -> str:
    """Restore a training ``.nemo``, strip it, save the inference ``.nemo``; returns the class name saved."""
    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401  (registers the package's target prefix)

    model = ASRModel.restore_from(src, map_location="cpu")
    plain = strip_for_inference(model) if hasattr(model, "inference_terms") else True
    model.eval()
    atomic_save(model, dst)
    return PLAIN_TARGET if plain else f"{type(model).__module__}.{type(model).__name__}"
