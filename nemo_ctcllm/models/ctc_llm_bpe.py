"""EncDecCTCLLMModelBPE: NeMo's EncDecCTCModelBPE plus composable training objectives.

At inference this *is* an ``EncDecCTCModelBPE`` (same ``forward``, ``transcribe``, decoding). During
training, ``training_step``/``validation_pass`` build one :class:`StepContext` per batch (final CTC
posteriors, encoder output, captured intermediate blocks) and hand it to :func:`compose_loss`, the one
place that weights and sums the terms listed under ``model.objectives``. With only ``ctc_final`` enabled
(weight 1) the loss and gradients equal the parent's.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from lightning.pytorch import Trainer
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.core.classes.mixins import AccessMixin
from nemo.utils import logging
from omegaconf import DictConfig, open_dict

from nemo_ctcllm.config import ConfigError, check_bool, check_int, merge_block, read_llm_block
from nemo_ctcllm.objectives.base import (
    ObjectiveEnv,
    StepContext,
    build_objectives,
    compose_loss,
    update_share_weight,
)
from nemo_ctcllm.objectives.shared.passes import preprocess

# model.bad_steps: what a non-finite (NaN/inf) training loss does. skip: the step is dropped (no parameter,
# optimizer-state or EMA update) and counted; max_consecutive such steps in a row stop training.
BAD_STEP_DEFAULTS = {"skip": True, "max_consecutive": 20}
# model.grad_shares: every_n_steps > 0 logs, on those training steps, each term's push on the encoder
# (_grad_shares); 0 (the default) costs nothing.
GRAD_SHARE_DEFAULTS = {"every_n_steps": 0}


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses too often (or once, with model.bad_steps.skip=false)."""


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
        llm = read_llm_block(cfg.get("llm"))
        if trainer is not None and llm["checkpoint"]:  # training: fail before the first step, not at it
            _check_llm_folder(llm["checkpoint"], llm["tensor_model_parallel_size"])
        self._bad_steps = _read_bad_steps(cfg.get("bad_steps"))
        shares = merge_block(cfg.get("grad_shares"), GRAD_SHARE_DEFAULTS, "model.grad_shares")
        check_int(shares.every_n_steps, "model.grad_shares.every_n_steps", 0)
        self._grad_share_every = int(shares.every_n_steps)
        if self._grad_share_every and llm["checkpoint"] and llm["activation_recompute"]:
            raise ConfigError(
                "model.grad_shares.every_n_steps > 0 differentiates each term alone with torch.autograd.grad, which "
                "megatron's activation recompute (a reentrant checkpoint) refuses: set "
                "model.llm.activation_recompute=false while logging or targeting shares, or "
                "model.grad_shares.every_n_steps=0"
            )
        super().__init__(cfg=cfg, trainer=trainer)
        env = self.objective_env()
        self.objectives, filled = build_objectives(self.cfg.get("objectives"), env)
        for term in self.objectives.values():
            if term.share is not None and not self._grad_share_every:
                raise ConfigError(
                    f"{term.share.key}.weight_mode is share, which moves the weight on grad-share logging steps, "
                    "but model.grad_shares.every_n_steps is 0: set it > 0 (e.g. 10)"
                )
        with open_dict(self.cfg):  # values read from elsewhere (the LLM's width): a restored .nemo needs no LLM
            for name, values in filled.items():
                if self.cfg.objectives.get(name) is None:  # a bare `clip:` block
                    self.cfg.objectives[name] = {}
                self.cfg.objectives[name].update(values)
        for term in self.objectives.values():
            for k, hook in term.encoder_hooks(env).items():
                self.encoder.layers[k - 1].register_forward_hook(hook)
        self._skipped_steps = 0  # non-finite steps skipped in this process (logged as train/skipped_steps)
        self._consecutive_bad = 0
        self._skip_this_step = False
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
        """The frozen LLM (``nemo_ctcllm.llm.LLMHost``), built from ``model.llm`` on first use (in training:
        at ``on_fit_start``).

        It is kept out of the module tree on purpose: no LLM tensor ever reaches ``state_dict()``, the
        ``.nemo``, a Lightning checkpoint, ``parameters()`` or the optimizer, and a restored model needs no
        LLM until an objective asks for it.
        """
        host = self.__dict__.get("_llm_host")
        if host is None:
            from nemo_ctcllm.llm import LLMHost

            cfg = read_llm_block(self.cfg.get("llm"))
            if not cfg["checkpoint"]:
                raise ConfigError(
                    "model.llm.checkpoint is not set: an objective needs the LLM; point it to a local Hugging Face "
                    "LLaMA folder (scripts/prepare_llm.py prepares the demo's SmolLM2)"
                )
            host = LLMHost(
                cfg["checkpoint"],
                tp_size=cfg["tensor_model_parallel_size"],
                activation_recompute=cfg["activation_recompute"],
            )
            self.__dict__["_llm_host"] = host  # plain attribute, not a submodule (see docstring)
        return host

    def on_fit_start(self):
        """Build the LLM (when ``model.llm.checkpoint`` is set) on every rank before sanity validation and the
        first step, not lazily inside a step, where TP / DP peers would already wait for it in a collective."""
        super().on_fit_start()
        llm = read_llm_block(self.cfg.get("llm"))
        if llm["checkpoint"]:
            from nemo_ctcllm.parallel import setup_llm_parallel

            # the TP groups at one point of the life cycle on every rank, over the trainer's process group
            # (whichever launcher started the job): nemo_ctcllm/parallel.py
            world = self._trainer.world_size if self._trainer is not None else 1
            setup_llm_parallel(world, llm["tensor_model_parallel_size"])
            self.llm  # the property builds and keeps the host

    # ------------------------------------------------------------------ what objectives see
    def objective_env(self) -> ObjectiveEnv:
        """What the objectives may use of this model (they never get the model itself)."""
        inter = (self.cfg.get("objectives") or {}).get("interctc")
        blocks = list(inter.get("blocks", [])) if inter is not None and inter.get("enabled", True) else []
        return ObjectiveEnv(
            tokenizer=self.tokenizer,
            vocab_size=self.decoder.num_classes_with_blank - 1,
            vocabulary=list(self.cfg.decoder.vocabulary),
            encoded_width=self.decoder._feat_in,  # what the final head reads: d_model or the encoder's out_proj
            n_features=self.cfg.preprocessor.get("features", None),
            interctc_blocks=tuple(blocks),
            llm_checkpoint=read_llm_block(self.cfg.get("llm"))["checkpoint"],
            llm=self._get_llm,
            ctc_loss=self.loss,
            ctc_wer=self._ctc_wer,
            final_head=self.decoder,
            encoder=self.encoder,
            preprocessor=self.preprocessor,
            spec_augment=self.spec_augmentation,
            model_guid=self.model_guid,
        )

    def _get_llm(self):
        return self.llm

    def _ctc_wer(self, log_probs, lengths, targets, target_len) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(WER, word errors, reference words) of greedy CTC on ``log_probs`` [B, T, V+1] with this model's WER
        metric (its decoding settings); the metric is reset afterwards."""
        self.wer.update(predictions=log_probs, predictions_lengths=lengths, targets=targets, targets_lengths=target_len)
        # this batch's counts read from the metric's states, not through compute(): torchmetrics' compute()
        # all-gathers over the ranks (sync_on_compute), a collective that a rank without labelled rows (no CTC
        # term this step) would never reach. Corpus WER sums these counts over the epoch (_aggregate), then
        # NeMo's epoch-end logging reduces it over the ranks, where every rank takes part.
        num, denom = self.wer.scores.detach().float(), self.wer.words.detach().float()
        self.wer.reset()
        return num / denom.clamp(min=1), num, denom

    # ------------------------------------------------------------------ forward pieces
    def encode(self, signal: torch.Tensor, signal_len: torch.Tensor):
        """The parent's forward, also returning the encoder output.

        signal [B, S], signal_len [B] -> encoded [B, D, T], encoded_len [B], log_probs [B, T, V+1]
        """
        processed, processed_len = preprocess(self.preprocessor, signal, signal_len)  # [B, F, T'] (a copy dithered)
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
        env = self.objective_env()
        if self.training:
            for term in self.objectives.values():
                term.before_training_step(env, self.optimizer_updates)
        if self._capture:
            AccessMixin.reset_registry(self)
            AccessMixin.set_access_enabled(access_enabled=True, guid=self.model_guid)
        try:
            encoded, encoded_len, log_probs = self.encode(signal, signal_len)
            layers = self._collect_layers() if self._capture else {}
        finally:
            if self._capture:
                AccessMixin.reset_registry(self)  # also disables access
        selfcond, heads = {}, {}
        for term in self.objectives.values():
            selfcond.update(term.pop_stash())
            heads.update(term.ctc_heads(env))
        return StepContext(
            env=env,
            signal=signal,
            signal_len=signal_len,
            encoded=encoded,
            encoded_len=encoded_len,
            log_probs=log_probs,
            targets=targets,
            target_len=target_len,
            layers=layers,
            selfcond_log_probs=selfcond,
            heads=heads,
            compute_wer=compute_wer,
            labelled=(target_len > 0) if self.semi_supervised else None,
            training=self.training,
            step=self.global_step,
        )

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch, batch_nb):
        log_every_n_steps = self._trainer.log_every_n_steps if self._trainer is not None else 1
        compute_wer = (batch_nb + 1) % log_every_n_steps == 0
        ctx = self.step_context(batch, compute_wer=compute_wer)
        every = self._grad_share_every
        weighted = {} if every and self.global_step % every == 0 else None
        loss, logs = compose_loss(self.objectives, ctx, step=self.global_step, prefix="train", weighted=weighted)
        if weighted is not None:
            logs.update(self._grad_shares(weighted, ctx))
            self._update_share_weights(logs)
        if self.semi_supervised:  # a rank whose rows are all unlabelled runs no CTC head: keep every parameter in
            trainable = [p.sum() for p in self.parameters() if p.requires_grad]  # its graph for DDP (zero grad)
            loss = loss + 0.0 * torch.stack(trainable).sum()
        loss = self._guard_non_finite(loss, logs, ctx, batch_nb)
        logs = {k: v for k, v in logs.items() if not k.endswith(("_wer_num", "_wer_denom"))}
        logs.update(
            {
                "train/skipped_steps": torch.tensor(float(self._skipped_steps)),
                "train_loss": loss.detach(),
                "learning_rate": torch.tensor(self._optimizer.param_groups[0]["lr"]),
                "global_step": torch.tensor(self.trainer.global_step, dtype=torch.float32),
            }
        )
        if compute_wer and "train/ctc_final_wer" in logs:
            logs["training_batch_wer"] = logs["train/ctc_final_wer"]
        return {"loss": loss, "log": logs}

    def _grad_shares(self, weighted: Dict[str, torch.Tensor], ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Each term's push on the encoder, for ``train/grad_norm|grad_share|grad_cos|grad_out_norm/<term>``.

        For term i with weighted loss L_i = w_i·loss_i: g_i = dL_i/dθ over the encoder's trainable parameters θ,
        share_i = |g_i| / Σ_j |g_j|, cos_i = <g_i, g_ctc_final> / (|g_i|·|g_ctc_final|), and |dL_i/dh| for the final
        encoder output h. One extra backward per term (retain_graph), on logging steps only; the step's own
        backward and gradients are unchanged. Every rank differentiates every term in the same order (a term that
        did not run here: 0·h), so the backward collectives (the LLM's TP group, SyncBatchNorm) match."""
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        names = sorted(self.objectives, key=lambda n: n != "ctc_final")  # ctc_final first: the cosines' reference
        grads, out_norms = {}, {}
        for name in names:
            term = weighted.get(name)
            if term is None or not term.requires_grad:
                term = 0.0 * ctx.encoded.sum()
            g = torch.autograd.grad(term, [*params, ctx.encoded], retain_graph=True, allow_unused=True)
            grads[name] = [x if x is not None else torch.zeros_like(p) for x, p in zip(g[:-1], params)]
            out_norms[name] = g[-1].norm() if g[-1] is not None else ctx.encoded.new_zeros(())
        norms = {n: torch.sqrt(sum((x.float() ** 2).sum() for x in g)) for n, g in grads.items()}
        total = sum(norms.values()).clamp(min=1e-30)
        ref = grads.get("ctc_final")
        logs = {}
        for name in names:
            logs[f"train/grad_norm/{name}"] = norms[name].detach()
            logs[f"train/grad_share/{name}"] = (norms[name] / total).detach()
            logs[f"train/grad_out_norm/{name}"] = out_norms[name].detach()
            if ref is not None:
                dot = sum((a.float() * b.float()).sum() for a, b in zip(grads[name], ref))
                cos = dot / (norms[name] * norms["ctc_final"]).clamp(min=1e-30)
                logs[f"train/grad_cos/{name}"] = cos.detach()
        return logs

    def _update_share_weights(self, logs: Dict[str, torch.Tensor]) -> None:
        """``weight_mode: share``: move each such term's weight towards the one that gives its target share
        (:func:`update_share_weight`), from this grad-share step's norms ``train/grad_norm/<term>``; the new weight
        acts from the next step on.

        Every rank gets the same weights because it computes them from the same numbers: the norms are averaged
        over the ranks (one all-reduce of a [terms] vector on the loss's device, on the same steps on every rank),
        then the update is the same float arithmetic everywhere. Averaging rather than broadcasting rank 0's
        weight lets every rank's batch count. A non-finite norm (a step the guards skip) changes no weight."""
        if not any(t.share is not None for t in self.objectives.values()):
            return
        names = list(self.objectives)
        local = torch.stack([logs[f"train/grad_norm/{n}"].float().reshape(()) for n in names])  # [terms]
        norms = dict(zip(names, _all_ranks_mean(local).tolist()))
        for name, term in self.objectives.items():
            if term.share is not None:
                others = sum(v for n, v in norms.items() if n != name)
                term.weight = update_share_weight(
                    term.weight, term.ramp(self.global_step), norms[name], others, term.share
                )

    def _guard_non_finite(self, loss: torch.Tensor, logs: Dict[str, torch.Tensor], ctx: StepContext, batch_nb: int):
        """A NaN/inf loss never reaches the weights, and every rank takes the same decision before backward.

        The non-finite terms are agreed over the whole world (one small all-reduce per step), so every rank
        marks the step, counts it and stops (``NonFiniteLossError``, one message naming every rank's batch)
        alike. The loss is returned unchanged: every rank back-propagates the same graph (the LLM's
        tensor-parallel and DDP collectives run as on any step), and ``on_before_optimizer_step`` then drops
        the gradients, so the optimizer (AdamW: no moment or weight-decay update for parameters without a
        gradient) and an EMA target leave everything as it was."""
        names = list(self.objectives)
        values = [logs[f"train/{n}"].float().reshape(()) if f"train/{n}" in logs else None for n in names]
        values = [v if v is not None else loss.new_zeros(()) for v in values] + [loss.detach().float().reshape(())]
        local = ~torch.isfinite(torch.stack(values))  # [terms + 1]: this rank's non-finite terms, weighted sum
        agreed = _all_ranks_max(local.float())
        if not bool(agreed.any()):
            self._consecutive_bad = 0
            return loss
        bad = [n for n, flag in zip(names, agreed.tolist()) if flag] or ["(weighted sum)"]
        batch = (
            f"batch {batch_nb} ({ctx.signal.shape[0]} utterances, audio samples {ctx.signal_len.tolist()}, "
            f"target lengths {ctx.target_len.tolist()})"
        )
        self._mark_bad_step(f"non-finite loss in term(s) {bad}", _per_rank(batch if bool(local.any()) else None))
        return loss

    def _mark_bad_step(self, what: str, where: str) -> None:
        """Count a skipped step (the same on every rank: ``what`` and ``where`` were agreed) and stop when
        ``model.bad_steps`` says so (``NonFiniteLossError``), else warn."""
        self._skipped_steps += 1
        self._consecutive_bad += 1
        self._skip_this_step = True
        where = f"step {self.global_step}" + (f", {where}" if where else "")
        cfg = self._bad_steps
        if not cfg["skip"] or self._consecutive_bad >= cfg["max_consecutive"]:
            limit = f"model.bad_steps.max_consecutive={cfg['max_consecutive']}"
            why = (
                "model.bad_steps.skip is false"
                if not cfg["skip"]
                else f"{self._consecutive_bad} consecutive steps ({limit})"
            )
            raise NonFiniteLossError(
                f"{what} at {where}; stopping: {why}. "
                f"{self._skipped_steps} step(s) skipped in total. Lower the learning rate or the term's weight, "
                "or look for bad data in these batches"
            )
        logging.warning(
            f"{what} at {where}: step skipped ({self._skipped_steps} so far, {self._consecutive_bad} in a row)"
        )

    def _guard_non_finite_grads(self) -> None:
        """A finite loss can still give an inf/NaN gradient (bf16 overflow in a backward, with no GradScaler to
        catch it); clipping would then spread NaN into every weight. Checked after backward, before clipping,
        agreed over every rank (one scalar all-reduce) and skipped like a non-finite loss."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        local = torch.stack([~torch.isfinite(g).all() for g in grads]).any() if grads else torch.tensor(False)
        local = local.float().reshape(1).to(next(self.parameters()).device)
        if bool(_all_ranks_max(local)[0]):
            self._mark_bad_step(
                "non-finite gradient", _per_rank("non-finite gradient here" if bool(local[0]) else None)
            )
        else:
            self._consecutive_bad = 0

    def on_train_start(self):
        """After a mid-epoch resume Lightning's logging step lags ``global_step`` by one (the checkpoint is
        written before its counter of stepped batches is incremented), so TensorBoard curves would overlap
        by a step; put the logging step back on ``global_step`` (one optimizer, so the two are equal)."""
        super().on_train_start()
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        if loop is not None and getattr(loop, "_batches_that_stepped", None) is not None:
            loop._batches_that_stepped = max(loop._batches_that_stepped, self.trainer.global_step)

    def on_train_end(self):
        """Stop lhotse's background bucketing thread: training that stops mid-epoch would leave it running and
        the process would never exit (``nemo_ctcllm.data.resumable.stop_loader_threads``)."""
        super().on_train_end()
        self.stop_loader_threads()

    def stop_loader_threads(self) -> None:
        from nemo_ctcllm.data.resumable import stop_loader_threads

        trainer = self._trainer
        loaders = [getattr(self, "_train_dl", None), getattr(trainer, "train_dataloader", None) if trainer else None]
        stop_loader_threads(*[dl for dl in loaders if dl is not None])

    @property
    def optimizer_updates(self) -> int:
        """Optimizer steps that changed the weights: ``global_step`` minus the skipped non-finite steps."""
        return self.global_step - self._skipped_steps

    def on_save_checkpoint(self, checkpoint):
        """Lightning checkpoints also carry the skipped-step count and (single process) the RNG states, so that
        a resumed run draws the same augmentation noise as the uninterrupted one, and the current weights of the
        ``weight_mode: share`` terms (plain floats, so a resume continues with exactly these weights; a ``.nemo``
        does not carry them: training from one starts again at the YAML weights)."""
        super().on_save_checkpoint(checkpoint)
        share_weights = {n: t.weight for n, t in self.objectives.items() if t.share is not None}
        checkpoint["nemo_ctcllm"] = {
            "skipped_steps": self._skipped_steps,
            "rng": _rng_states(),
            "share_weights": share_weights,
        }

    def on_load_checkpoint(self, checkpoint):
        """Restores what :meth:`on_save_checkpoint` added. A share-mode term the checkpoint has no weight for (share
        mode newly turned on) starts at its YAML weight; a saved weight of a term now in fixed mode is ignored."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("nemo_ctcllm", {})
        self._skipped_steps = int(state.get("skipped_steps", 0))
        for name, weight in state.get("share_weights", {}).items():
            term = self.objectives[name] if name in self.objectives else None
            if term is not None and term.share is not None:
                term.weight = float(weight)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if state.get("rng") is not None and world == 1:  # rank 0's states would make every rank draw alike
            _set_rng_states(state["rng"])

    def on_before_optimizer_step(self, optimizer):
        """Drop the gradients of a step marked by ``_guard_non_finite`` or ``_guard_non_finite_grads`` (marked on
        every rank alike)."""
        if not self._skip_this_step:
            self._guard_non_finite_grads()
        if self._skip_this_step:
            for p in self.parameters():
                p.grad = None
        self._skip_this_step = False
        super().on_before_optimizer_step(optimizer)

    def validation_pass(self, batch, batch_idx, dataloader_idx=0):
        """One evaluation batch of this rank's shard (``nemo_ctcllm.data.eval_shards``). ``val_utterances`` is the
        weight of its values in the epoch means (:func:`_aggregate`): its utterances, or 0 for a filler batch,
        which runs like any batch (its TP peers' collectives are matched) with every row unlabelled, so that no
        term reads it and no LLM objective gathers it, and which is counted nowhere."""
        import dataclasses

        ctx = self.step_context(batch, compute_wer=True)
        filler = self._is_filler(batch_idx, dataloader_idx)
        if filler:
            ctx = dataclasses.replace(ctx, labelled=torch.zeros_like(ctx.target_len, dtype=torch.bool))  # [B]
        loss, logs = compose_loss(self.objectives, ctx, step=self.global_step, prefix="val")
        utterances = loss.new_tensor(0.0 if filler else float(ctx.signal.shape[0]))  # on the loss's device
        if filler:
            return {"val_utterances": utterances}
        metrics = dict(logs)
        metrics["val_loss"] = loss.detach()
        metrics["val_wer_num"] = logs["val/ctc_final_wer_num"]  # NeMo's val_wer is the final head's
        metrics["val_wer_denom"] = logs["val/ctc_final_wer_denom"]
        metrics["val_utterances"] = utterances
        return metrics

    def _is_filler(self, batch_idx: int, dataloader_idx: int) -> bool:
        """Whether this batch is the filler a short shard ends with (``EvalShardSampler.is_filler``)."""
        from nemo_ctcllm.data.eval_shards import EvalShardSampler

        trainer = self._trainer
        if trainer is None:
            return False
        testing = getattr(trainer, "testing", False)
        loaders = getattr(trainer, "test_dataloaders" if testing else "val_dataloaders", None)
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[dataloader_idx]
        sampler = getattr(loaders, "sampler", None)
        return isinstance(sampler, EvalShardSampler) and sampler.is_filler(batch_idx)

    def multi_validation_epoch_end(self, outputs, dataloader_idx: int = 0):
        """NeMo's ``val_loss``/``val_wer`` and every term's ``val/...`` values, pooled over every rank's shard."""
        logs = _aggregate(outputs, split="val", device=self.device)
        return {**({"val_loss": logs["val_loss"]} if "val_loss" in logs else {}), "log": logs}

    def multi_test_epoch_end(self, outputs, dataloader_idx: int = 0):
        """As :meth:`multi_validation_epoch_end`, for ``test_loss``/``test_wer``/``test/...``."""
        logs = _aggregate(outputs, split="test", device=self.device)
        return {**({"test_loss": logs["test_loss"]} if "test_loss" in logs else {}), "log": logs}

    def setup_validation_data(self, val_data_config):
        """NeMo's validation loader, sharded over the ranks (``nemo_ctcllm.data.eval_shards``)."""
        from nemo_ctcllm.data.eval_shards import shard_eval_loader

        super().setup_validation_data(val_data_config)
        self._validation_dl = shard_eval_loader(self._validation_dl)

    def setup_test_data(self, test_data_config):
        """NeMo's test loader, sharded over the ranks (``nemo_ctcllm.data.eval_shards``)."""
        from nemo_ctcllm.data.eval_shards import shard_eval_loader

        super().setup_test_data(test_data_config)
        self._test_dl = shard_eval_loader(self._test_dl)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        logs = self.validation_pass(batch, batch_idx, dataloader_idx=dataloader_idx)
        test_logs = {k.replace("val_", "test_", 1).replace("val/", "test/", 1): v for k, v in logs.items()}
        if isinstance(self.trainer.test_dataloaders, list) and len(self.trainer.test_dataloaders) > 1:
            self.test_step_outputs[dataloader_idx].append(test_logs)
        else:
            self.test_step_outputs.append(test_logs)
        return test_logs

    def setup_training_data(self, train_data_config):
        """NeMo's training loader, made resumable mid-epoch (``nemo_ctcllm.data.resumable``)."""
        super().setup_training_data(train_data_config)
        from nemo_ctcllm.data.resumable import make_resumable

        seed = train_data_config.get("seed", 0) if train_data_config is not None else 0
        self._train_dl = make_resumable(self._train_dl, seed=seed if isinstance(seed, int) else 0)

    # ------------------------------------------------------------------ .nemo files
    def save_to(self, save_path: str):
        """NeMo's ``save_to`` through a temporary file in the same folder, then an atomic rename, so that a
        ``.nemo`` written during training (NeMo's checkpoint callback calls this) is never half-written."""
        import os
        import tempfile

        from nemo.utils.get_rank import is_global_rank_zero

        from nemo_ctcllm.export import publish

        folder = os.path.dirname(os.path.abspath(save_path))
        os.makedirs(folder, exist_ok=True)
        if not is_global_rank_zero():
            return super().save_to(save_path)  # NeMo writes nothing on other ranks
        fd, tmp = tempfile.mkstemp(suffix=".nemo.tmp", dir=folder)
        os.close(fd)
        try:
            super().save_to(tmp)
            publish(tmp, save_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

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


def _rng_states() -> dict:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]  # plain types: weights_only loads
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_ranks_mean(x: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``x`` over every rank (``x`` itself in a single process). ``x`` lives on the loss's
    device (a CUDA tensor under NCCL, which refuses CPU tensors); every rank receives the same values."""
    if _world() == 1:
        return x
    out = x.clone()
    torch.distributed.all_reduce(out)  # sum
    return out / _world()


def _all_ranks_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``x`` over every rank (``x`` itself in a single process); returned on x's device."""
    if _world() == 1:
        return x
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = x.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(x.device)


def _per_rank(text: Optional[str]) -> str:
    """``text`` of this rank; in a multi-process run every rank's (None: nothing to say), as one identical line
    on every rank (a collective: call it on every rank)."""
    if _world() == 1:
        return text or ""
    parts = [None] * _world()
    torch.distributed.all_gather_object(parts, text)
    return "; ".join(f"rank {r}: {t}" for r, t in enumerate(parts) if t is not None)


def _check_llm_folder(checkpoint: str, tp: int) -> None:
    from nemo_ctcllm.llm.convert import LLMCheckpointError
    from nemo_ctcllm.llm.host import validate_llm_folder

    try:
        validate_llm_folder(checkpoint, tp)
    except LLMCheckpointError as e:
        msg = str(e) if "model.llm" in str(e) else f"model.llm.checkpoint={checkpoint}: {e}"
        raise ConfigError(msg) from e


def _read_bad_steps(block) -> dict:
    merged = merge_block(block, BAD_STEP_DEFAULTS, "model.bad_steps")
    check_bool(merged.skip, "model.bad_steps.skip")
    check_int(merged.max_consecutive, "model.bad_steps.max_consecutive", 1)
    return dict(merged)


def _aggregate(outputs: List[dict], split: str, device: torch.device) -> Dict[str, torch.Tensor]:
    """The epoch's values over every rank's shard (each rank evaluated its own utterances), identical on every rank.

    Corpus WER per head (``<split>_wer``, ``<split>/<head>_wer``): word errors summed over every batch of every
    rank / reference words summed likewise; not a mean of per-rank or per-batch WERs. Every other value (the
    loss, each term's loss and stats): the mean over batches weighted by their utterances
    (``<split>_utterances``; 0 for a filler batch), i.e. sum_b n_b v_b / sum_b n_b over every rank, which for a
    batch-mean loss (CTC's ``mean_batch``) is the mean over the utterances whatever the batching. A collective
    (``sum_over_ranks``, on ``device``, the loss's): every rank calls it, at epoch end, with its own outputs."""
    from nemo_ctcllm.data.eval_shards import sum_over_ranks

    count_key = f"{split}_utterances"
    local: Dict[str, torch.Tensor] = {}
    for x in outputs:
        n = x[count_key].detach().double()
        for k, v in x.items():
            if k == count_key or k.endswith("_wer"):  # a batch's WER: pooled from its counts below
                continue
            v = v.detach().double()
            if k.endswith(("_wer_num", "_wer_denom")):
                local[k] = local.get(k, 0.0) + v
            else:  # "sum:<key>" and "n:<key>": weighted sum and weight
                local[f"sum:{k}"] = local.get(f"sum:{k}", 0.0) + n * v
                local[f"n:{k}"] = local.get(f"n:{k}", 0.0) + n
    total = sum_over_ranks(local, device)
    out: Dict[str, torch.Tensor] = {}
    for k, v in total.items():
        if k.endswith("_wer_num"):
            base = k[: -len("_num")]
            out[base] = (v / total[base + "_denom"].clamp(min=1)).float()
        elif k.startswith("sum:") and total[f"n:{k[4:]}"] > 0:  # never counted (filler batches only): not logged
            out[k[4:]] = (v / total[f"n:{k[4:]}"]).float()
    return out
