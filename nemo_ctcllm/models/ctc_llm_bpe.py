"""EncDecCTCLLMModelBPE: NeMo's EncDecCTCModelBPE plus composable training objectives.

At inference this *is* an ``EncDecCTCModelBPE`` (same ``forward``, ``transcribe``, decoding). During
training, ``training_step``/``validation_pass`` build one :class:`StepContext` per batch (final CTC
posteriors, encoder output, captured intermediate blocks) and hand it to :func:`compose_loss`, the one
place that weights and sums the terms listed under ``model.objectives``. With only ``ctc_final`` enabled
(weight 1) the loss and gradients equal the parent's.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from lightning.pytorch import Trainer
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.core.classes.mixins import AccessMixin
from omegaconf import DictConfig

from nemo_ctcllm.objectives.base import ConfigError, StepContext, build_objectives, compose_loss


LLM_DEFAULTS = {"checkpoint": None, "tensor_model_parallel_size": 1, "cache_dir": None}


class EncDecCTCLLMModelBPE(EncDecCTCModelBPE):
    """CTC-BPE model with intermediate CTC heads and pluggable (LLM-based) regularizers.

    Config: everything ``EncDecCTCModelBPE`` takes, plus ``model.objectives`` (one block per objective,
    see ``nemo_ctcllm.objectives``). NeMo's own ``model.interctc`` block is rejected in favour of
    ``model.objectives.interctc`` so that there is one loss composition.
    """

    def __init__(self, cfg: DictConfig, trainer: Optional[Trainer] = None):
        if cfg.get("interctc") is not None:
            raise ConfigError(
                "model.interctc (NeMo's InterCTC) is not used by EncDecCTCLLMModelBPE: "
                "configure intermediate heads under model.objectives.interctc (blocks, weights)"
            )
        llm = cfg.get("llm")
        if llm is not None:
            unknown = sorted(set(llm.keys()) - set(LLM_DEFAULTS))
            if unknown:
                raise ConfigError(f"model.llm: unknown key(s) {unknown}; allowed keys: {sorted(LLM_DEFAULTS)}")
            tp = llm.get("tensor_model_parallel_size", 1)
            if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
                raise ConfigError(f"model.llm.tensor_model_parallel_size must be an integer >= 1, got {tp!r}")
        super().__init__(cfg=cfg, trainer=trainer)
        self.objectives = build_objectives(self.cfg.get("objectives"), self)
        self._capture = sorted({b for t in self.objectives.values() for b in t.capture_blocks})
        # Semi-supervised training: with an objective that reads unlabelled rows, an empty target (a manifest
        # line without `text`) marks an unlabelled row; otherwise an empty target is an ordinary (all-blank)
        # CTC target, as in NeMo.
        self.semi_supervised = any(t.uses_unlabelled for t in self.objectives.values())
        if self._capture:
            # The Conformer encoder registers "interctc/layer_output_{l}" for these 0-based layers.
            AccessMixin.update_access_cfg(
                {"interctc": {"capture_layers": [b - 1 for b in self._capture]}}, guid=self.model_guid
            )
            self.propagate_model_guid()

    # ------------------------------------------------------------------ the frozen LLM
    @property
    def llm(self):
        """The frozen LLM (``nemo_ctcllm.llm.LLMHost``), built from ``model.llm`` on first use.

        It is kept out of the module tree on purpose: no LLM tensor ever reaches ``state_dict()``, the
        ``.nemo``, a Lightning checkpoint, ``parameters()`` or the optimizer, and a restored model needs no
        LLM until an objective asks for it.
        """
        host = self.__dict__.get("_llm_host")
        if host is None:
            from nemo_ctcllm.llm import LLMHost

            cfg = self.cfg.get("llm")
            if cfg is None or not cfg.get("checkpoint"):
                raise ConfigError(
                    "model.llm.checkpoint is not set: an objective needs the LLM; point it to a local Hugging Face "
                    "LLaMA folder (scripts/prepare_llm.py prepares the demo's SmolLM2)"
                )
            cfg = {**LLM_DEFAULTS, **cfg}
            host = LLMHost(cfg["checkpoint"], tp_size=cfg["tensor_model_parallel_size"], cache_dir=cfg["cache_dir"])
            self.__dict__["_llm_host"] = host  # plain attribute, not a submodule (see docstring)
        return host

    # ------------------------------------------------------------------ forward pieces
    def encode(self, signal: torch.Tensor, signal_len: torch.Tensor):
        """The parent's forward, also returning the encoder output.

        signal [B, S], signal_len [B] -> encoded [B, D, T], encoded_len [B], log_probs [B, T, V+1]
        """
        processed, processed_len = self.preprocessor(input_signal=signal, length=signal_len)  # [B, F, T']
        if self.spec_augmentation is not None and self.training:
            processed = self.spec_augmentation(input_spec=processed, length=processed_len)
        encoded, encoded_len = self.encoder(audio_signal=processed, length=processed_len)  # [B, D, T]
        log_probs = self.decoder(encoder_output=encoded)  # [B, T, V+1]
        return encoded, encoded_len, log_probs

    def _collect_layers(self) -> Dict[int, tuple]:
        """Captured block outputs {k: (output [B, D, T], length [B])} from the AccessMixin registry."""
        registry = {}
        for module_registry in AccessMixin.get_module_registry(self.encoder).values():
            registry.update(module_registry)
        layers = {}
        for k in self._capture:
            outs = registry.get(f"interctc/layer_output_{k - 1}")
            lens = registry.get(f"interctc/layer_length_{k - 1}")
            if not outs or not lens or len(outs) != 1:
                raise RuntimeError(
                    f"encoder block {k} was not captured exactly once (got {0 if not outs else len(outs)}); "
                    "does the encoder support NeMo's InterCTC capture?"
                )
            layers[k] = (outs[0], lens[0])
        return layers

    def step_context(self, batch, compute_wer: bool) -> StepContext:
        """Run the encoder once and package what the objectives read."""
        signal, signal_len, targets, target_len = batch[:4]
        if self._capture:
            AccessMixin.reset_registry(self)
            AccessMixin.set_access_enabled(access_enabled=True, guid=self.model_guid)
        try:
            encoded, encoded_len, log_probs = self.encode(signal, signal_len)
            layers = self._collect_layers() if self._capture else {}
        finally:
            if self._capture:
                AccessMixin.reset_registry(self)  # also disables access
        selfcond = {}
        for term in self.objectives.values():
            stash = term.pop_stash() if hasattr(term, "pop_stash") else None
            if stash is not None:
                selfcond[term.block] = stash
        return StepContext(
            model=self,
            signal=signal,
            signal_len=signal_len,
            encoded=encoded,
            encoded_len=encoded_len,
            log_probs=log_probs,
            targets=targets,
            target_len=target_len,
            layers=layers,
            selfcond_log_probs=selfcond,
            compute_wer=compute_wer,
            labelled=(target_len > 0) if self.semi_supervised else None,
        )

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch, batch_nb):
        log_every_n_steps = self._trainer.log_every_n_steps if self._trainer is not None else 1
        compute_wer = (batch_nb + 1) % log_every_n_steps == 0
        ctx = self.step_context(batch, compute_wer=compute_wer)
        loss, logs = compose_loss(self.objectives, ctx, step=self.global_step, prefix="train")
        logs = {k: v for k, v in logs.items() if not k.endswith(("_wer_num", "_wer_denom"))}
        logs.update(
            {
                "train_loss": loss.detach(),
                "learning_rate": torch.tensor(self._optimizer.param_groups[0]["lr"]),
                "global_step": torch.tensor(self.trainer.global_step, dtype=torch.float32),
            }
        )
        if compute_wer and "train/ctc_final_wer" in logs:
            logs["training_batch_wer"] = logs["train/ctc_final_wer"]
        return {"loss": loss, "log": logs}

    def validation_pass(self, batch, batch_idx, dataloader_idx=0):
        ctx = self.step_context(batch, compute_wer=True)
        loss, logs = compose_loss(self.objectives, ctx, step=self.global_step, prefix="val")
        metrics = dict(logs)
        metrics["val_loss"] = loss.detach()
        metrics["val_wer_num"] = logs["val/ctc_final_wer_num"]  # NeMo's val_wer is the final head's
        metrics["val_wer_denom"] = logs["val/ctc_final_wer_denom"]
        return metrics

    def multi_validation_epoch_end(self, outputs, dataloader_idx: int = 0):
        metrics = super().multi_validation_epoch_end(outputs, dataloader_idx)
        metrics["log"].update(_aggregate(outputs, prefix="val/"))
        return metrics

    def multi_test_epoch_end(self, outputs, dataloader_idx: int = 0):
        metrics = super().multi_test_epoch_end(outputs, dataloader_idx)
        metrics["log"].update(_aggregate(outputs, prefix="test/"))
        return metrics

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        logs = self.validation_pass(batch, batch_idx, dataloader_idx=dataloader_idx)
        test_logs = {k.replace("val_", "test_", 1).replace("val/", "test/", 1): v for k, v in logs.items()}
        if isinstance(self.trainer.test_dataloaders, list) and len(self.trainer.test_dataloaders) > 1:
            self.test_step_outputs[dataloader_idx].append(test_logs)
        else:
            self.test_step_outputs.append(test_logs)
        return test_logs

    def setup_optimizer_param_groups(self):
        """NeMo's param groups, keeping only parameters that train (frozen targets, e.g. an EMA copy, stay out)."""
        super().setup_optimizer_param_groups()
        groups = []
        for group in self._optimizer_param_groups or []:
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                groups.append({**group, "params": params})
        self._optimizer_param_groups = groups

    # ------------------------------------------------------------------ export
    def inference_terms(self) -> List[str]:
        """Names of objective modules that the inference forward pass needs (self-conditioning)."""
        return [name for name, t in self.objectives.items() if t.needed_at_inference]


def _aggregate(outputs: List[dict], prefix: str) -> Dict[str, torch.Tensor]:
    """Epoch means of per-batch term losses, and corpus WER (sum num / sum denom) per head."""
    out: Dict[str, torch.Tensor] = {}
    keys = [k for k in outputs[0] if k.startswith(prefix)]
    for k in keys:
        if k.endswith("_wer_num"):
            base = k[: -len("_num")]
            num = torch.stack([x[k] for x in outputs]).sum()
            den = torch.stack([x[base + "_denom"] for x in outputs]).sum()
            out[base] = num / den.clamp(min=1)
        elif not k.endswith(("_wer_denom", "_wer")):
            out[k] = torch.stack([x[k].float() for x in outputs]).mean()
    return out
