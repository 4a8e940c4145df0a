"""Token-level (frame-level) contrastive learning on the encoder output: SimCLR or BYOL (``token_contrastive``).

The target is a deep copy of the model's encoder (``env.encoder``) with every forward hook removed (the copy
would otherwise run the online model's self-conditioning hooks, which close over the online heads), and every
extra encoder pass (online view B and target) runs with the model's AccessMixin capture switched off, so no tensor is
registered into the InterCTC capture registry and no self-conditioning stash is overwritten (the copy shares
the model's ``model_guid`` because ``propagate_model_guid`` walks every submodule). With self-conditioning on,
the target therefore is the encoder without the conditioning.

The maths, the YAML block and the cost: docs/objectives.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from nemo.collections.asr.modules import SpectrogramAugmentation

from nemo_ctcllm.config import check_choice, check_int, check_number
from nemo_ctcllm.objectives.base import Objective, ObjectiveConfig, ObjectiveEnv, Stats, StepContext, register_objective
from nemo_ctcllm.objectives.shared.passes import access_disabled, preprocess
from nemo_ctcllm.objectives.shared.tensors import length_mask, masked_mean


# ---------------------------------------------------------------------------------------------- shared helpers
def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with ``requires_grad=False``, no forward/backward hooks and empty AccessMixin registries.

    ``copy.deepcopy`` copies hook dicts but not the functions in them, so hooks installed on the original
    (e.g. self-conditioning, closing over the online model) would otherwise run on the copy too.
    """
    clone = copy.deepcopy(module)
    for m in clone.modules():
        for hooks in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            if hasattr(m, hooks):
                getattr(m, hooks).clear()
        if isinstance(getattr(m, "_registry", None), dict):
            m._registry = {}
    clone.requires_grad_(False)
    return clone


def frame_index(
    lengths: torch.Tensor, size: int, k: Optional[int], generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which frames to use: idx [B, K] (frame positions) and keep [B, K] (True where idx is a valid frame).

    k None: every frame (K = size). Otherwise at most k distinct valid frames per utterance, uniformly at
    random from ``generator`` (K = min(k, size); utterances shorter than k keep all their frames).
    """
    B = lengths.shape[0]
    valid = length_mask(lengths, size)  # [B, T]
    if k is None or k >= size:
        return torch.arange(size, device=lengths.device).expand(B, size), valid
    scores = torch.rand(B, size, generator=generator).to(lengths.device)  # [B, T] in [0, 1)
    scores = scores.masked_fill(~valid, 2.0)  # invalid frames sort last
    idx = scores.topk(k, dim=1, largest=False).indices  # [B, K]
    return idx, torch.gather(valid, 1, idx)


def gather_frames(x: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B, T, C], idx/keep [B, K] -> the kept frames [N, C] (utterance-major order)."""
    picked = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, C]
    return picked[keep]


def mlp(d_in: int, d_hidden: int, d_out: int) -> torch.nn.Sequential:
    """Linear -> LayerNorm -> ReLU -> Linear. LayerNorm (not BatchNorm) keeps frames independent of padding."""
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden), torch.nn.LayerNorm(d_hidden), torch.nn.ReLU(), torch.nn.Linear(d_hidden, d_out)
    )


NEGATIVES = ("cross_view", "nt_xent")


def near_frames(utt: torch.Tensor, pos: torch.Tensor, window: int) -> torch.Tensor:
    """[N, N] bool: frames i, j of the same utterance (utt [N]) at most ``window`` frames apart (pos [N])."""
    return (utt[:, None] == utt[None, :]) & ((pos[:, None] - pos[None, :]).abs() <= window)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    negatives: str = "cross_view",
    exclude: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of paired unit vectors a, b [N, P] (row i of a and b is a positive pair), with the negatives of
    ``negatives`` (docs/objectives.md). ``exclude`` [N, N] bool: pairs (i, j) that are never negatives of each
    other (the positive and the anchor itself are handled here).

    Returns (loss, top-1 accuracy of retrieving the positive, averaged over anchors).
    """
    N = a.shape[0]
    labels = torch.arange(N, device=a.device)
    eye = torch.eye(N, dtype=torch.bool, device=a.device)
    drop = torch.zeros_like(eye) if exclude is None else exclude & ~eye  # [N, N]: never the positive
    if negatives == "cross_view":
        logits = (a @ b.t() / temperature).masked_fill(drop, float("-inf"))  # [N, N]
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        acc = 0.5 * ((logits.argmax(1) == labels).float().mean() + (logits.argmax(0) == labels).float().mean())
        return loss, acc.detach()
    u = torch.cat([a, b])  # [2N, P]
    block = drop | eye  # same-view pairs: never the anchor itself
    drop2 = torch.cat([torch.cat([block, drop]), torch.cat([drop, block])], 1)  # [2N, 2N]
    logits = (u @ u.t() / temperature).masked_fill(drop2, float("-inf"))  # [2N, 2N]
    target = torch.cat([labels + N, labels])  # [2N]: the other view of the same frame
    return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean().detach()


def add_noise(signal: torch.Tensor, lengths: torch.Tensor, snr_db: float) -> torch.Tensor:
    """signal [B, S] + white Gaussian noise at ``snr_db`` relative to each utterance's power (valid samples
    only; the padding stays zero)."""
    valid = length_mask(lengths, signal.shape[1])  # [B, S]
    power = masked_mean(signal.pow(2), valid, dim=1)  # [B]
    std = (power / 10.0 ** (snr_db / 10.0)).sqrt()  # [B]
    return signal + torch.randn_like(signal) * std[:, None] * valid.to(signal.dtype)


# ---------------------------------------------------------------------------------------------- the objective
class TokenContrastive(Objective):
    """SimCLR or BYOL between frame-aligned views of each utterance (docs/objectives.md)."""

    # It needs no transcript, so it reads every row: a batch is never empty, and its extra training-mode encoder
    # passes (collectives under sync_batchnorm) run on every rank at every step (docs/reliability.md).
    uses_unlabelled = True

    def __init__(
        self,
        name: str,
        weight: float,
        warmup_steps: int,
        width: int,
        block: "TokenContrastiveConfig",
        every_n_steps: int = 1,
    ):
        super().__init__(name, weight, warmup_steps, every_n_steps=every_n_steps)
        self.mode = block.mode
        self.temperature = float(block.temperature)
        self.frames_per_utt = int(block.frames_per_utt)
        self.negatives, self.exclude_window = block.negatives, int(block.exclude_window)
        self.ema_decay = float(block.ema_decay)
        self.noise_snr_db = None if block.noise_snr_db is None else float(block.noise_snr_db)
        self.projector = mlp(width, width, block.proj_dim)
        self.augment = None
        if block.freq_masks + block.time_masks > 0:
            self.augment = SpectrogramAugmentation(
                freq_masks=block.freq_masks,
                time_masks=block.time_masks,
                freq_width=block.freq_width,
                time_width=block.time_width,
            )
        if self.mode == "byol":
            self.predictor = mlp(block.proj_dim, width, block.proj_dim)
            self.target_encoder: Optional[torch.nn.Module] = None  # set by attach_target (needs the encoder)
            self.target_projector = frozen_copy(self.projector)
            # False until the first training forward copies the online weights (after init_from_nemo_model etc.)
            self.register_buffer("target_ready", torch.zeros((), dtype=torch.bool))
            self._ema_step: Optional[int] = None

    def attach_target(self, encoder: torch.nn.Module) -> None:
        """BYOL: the EMA target encoder, a hook-free frozen copy of the model's encoder."""
        self.target_encoder = frozen_copy(encoder)

    # ------------------------------------------------------------------ pieces (also used by the tests)
    def project_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [..., D] -> unit-norm projections z = g(h) / ||g(h)|| [..., P], frame by frame."""
        return F.normalize(self.projector(frames), dim=-1)

    def project(self, encoded: torch.Tensor) -> torch.Tensor:
        """encoded [B, D, T] -> [B, T, P] (per frame, so padding cannot leak into a valid frame)."""
        return self.project_frames(encoded.transpose(1, 2))

    def features(self, ctx: StepContext, noisy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Preprocessor features [B, F, T'] and lengths [B] of the batch's audio (+ noise when training)."""
        signal = ctx.signal  # [B, S]
        if noisy and self.training and self.noise_snr_db is not None:
            signal = add_noise(signal, ctx.signal_len, self.noise_snr_db)
        return preprocess(ctx.env.preprocessor, signal, ctx.signal_len)  # dithers a copy, never the batch

    def view_b_features(self, ctx: StepContext) -> Tuple[torch.Tensor, torch.Tensor]:
        """View B's encoder input [B, F, T']: noise + this block's own SpecAugment (training only)."""
        feats, feats_len = self.features(ctx, noisy=True)
        if self.training and self.augment is not None:
            feats = self.augment(input_spec=feats, length=feats_len)
        return feats, feats_len

    @staticmethod
    def run_encoder(
        env: ObjectiveEnv, encoder: torch.nn.Module, feats: torch.Tensor, feats_len: torch.Tensor
    ) -> torch.Tensor:
        """An extra encoder pass with the model's capture off: feats [B, F, T'] -> encoded [B, D, T]."""
        with access_disabled(env.model_guid):
            encoded, _ = encoder(audio_signal=feats, length=feats_len)
        return encoded

    def view_b(self, ctx: StepContext) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """View B through the online encoder, [B, D, T], and its encoder input (features [B, F, T'], lengths [B]).

        In eval mode nothing is augmented, so view B is view A: (ctx.encoded, None), no extra forward.
        """
        if not self.training:
            return ctx.encoded, None
        feats, feats_len = self.view_b_features(ctx)
        encoded = self.run_encoder(ctx.env, ctx.env.encoder, feats, feats_len)
        if encoded.shape != ctx.encoded.shape:
            raise RuntimeError(
                f"view B {tuple(encoded.shape)} is not frame-aligned with view A {tuple(ctx.encoded.shape)}"
            )
        return encoded, (feats, feats_len)

    # ------------------------------------------------------------------ BYOL target
    def before_training_step(self, env: ObjectiveEnv, optimizer_updates: int) -> None:
        """BYOL: one EMA update per applied optimizer step (steps skipped for a non-finite loss don't count)."""
        if self.mode == "byol" and optimizer_updates != self._ema_step:
            self.ema_update(env.encoder)
            self._ema_step = optimizer_updates

    @torch.no_grad()
    def ema_update(self, encoder: torch.nn.Module) -> None:
        """xi <- d * xi + (1 - d) * theta for encoder + projector (d = 0 the first time); buffers copied."""
        decay = self.ema_decay if bool(self.target_ready) else 0.0
        for target, online in ((self.target_encoder, encoder), (self.target_projector, self.projector)):
            for (nt, pt), (no, po) in zip(target.named_parameters(), online.named_parameters(), strict=True):
                assert nt == no, (nt, no)
                pt.lerp_(po.detach(), 1.0 - decay)
            for bt, bo in zip(target.buffers(), online.buffers(), strict=True):
                if bt.shape == bo.shape:  # derived buffers (positional tables) may be extended separately
                    bt.copy_(bo)
        self.target_ready.fill_(True)

    @torch.no_grad()
    def target_embed(self, env: ObjectiveEnv, feats: torch.Tensor, feats_len: torch.Tensor) -> torch.Tensor:
        """Target branch: feats [B, F, T'] -> unit-norm z' [B, T, P], no gradient."""
        encoded = self.run_encoder(env, self.target_encoder, feats, feats_len)  # [B, D, T]
        return F.normalize(self.target_projector(encoded.transpose(1, 2)), dim=-1)

    def online_predict(self, encoded: torch.Tensor) -> torch.Tensor:
        """Online branch: encoded [B, D, T] -> unit-norm predictions p [B, T, P]."""
        return F.normalize(self.predictor(self.projector(encoded.transpose(1, 2))), dim=-1)

    # ------------------------------------------------------------------ losses
    def simclr(self, ctx: StepContext, enc_b: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
        generator = torch.Generator().manual_seed(int(ctx.step))
        idx, keep = frame_index(ctx.encoded_len, ctx.encoded.shape[2], self.frames_per_utt, generator)  # [B, K]
        za = self.project_frames(gather_frames(ctx.encoded.transpose(1, 2), idx, keep))  # [N, P]
        zb = self.project_frames(gather_frames(enc_b.transpose(1, 2), idx, keep))  # [N, P]
        exclude = None
        if self.exclude_window > 0:
            utt = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)[keep]  # [N]
            exclude = near_frames(utt, idx[keep], self.exclude_window)  # [N, N]
        loss, acc = info_nce(za, zb, self.temperature, self.negatives, exclude)
        return loss, {"acc": acc, "frames": za.new_tensor(float(za.shape[0]))}

    def byol(self, ctx: StepContext, enc_b: torch.Tensor, input_b) -> Tuple[torch.Tensor, Stats]:
        env = ctx.env
        valid = length_mask(ctx.encoded_len, ctx.encoded.shape[2])  # [B, T]
        p_a = self.online_predict(ctx.encoded)  # [B, T, P]
        p_b = self.online_predict(enc_b)  # [B, T, P]
        clean, clean_len = self.features(ctx, noisy=False)  # [B, F, T'], [B]
        if input_b is None:  # eval: both views are the clean input
            z_b = z_a = self.target_embed(env, clean, clean_len)  # [B, T, P]
        else:
            z_b = self.target_embed(env, *input_b)  # the very input the online view-B pass saw
            if env.spec_augment is not None:  # A': the model's own augmentation, fresh masks
                clean = env.spec_augment(input_spec=clean, length=clean_len)
            z_a = self.target_embed(env, clean, clean_len)  # [B, T, P]
        cos_ab = (p_a * z_b).sum(-1)  # [B, T]
        cos_ba = (p_b * z_a).sum(-1)  # [B, T]
        cos = 0.5 * (masked_mean(cos_ab, valid, dim=(0, 1)) + masked_mean(cos_ba, valid, dim=(0, 1)))
        return 2.0 - 2.0 * cos, {"cos": cos.detach()}

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:
        enc_b, input_b = self.view_b(ctx)  # [B, D, T], encoder input of view B (None in eval)
        return self.simclr(ctx, enc_b) if self.mode == "simclr" else self.byol(ctx, enc_b, input_b)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TokenContrastiveConfig(ObjectiveConfig):
    mode: str = "simclr"  # simclr or byol
    proj_dim: int = 128  # projection width P
    temperature: float = 0.1  # SimCLR's tau
    frames_per_utt: int = 32  # SimCLR: frames sampled per utterance
    negatives: str = "cross_view"  # SimCLR: one of NEGATIVES
    exclude_window: int = 0  # SimCLR: frames this close to the anchor (same utterance) are not negatives
    ema_decay: float = 0.99  # BYOL: d of the EMA target
    noise_snr_db: Optional[float] = None  # view B: Gaussian noise at this SNR (null: none)
    freq_masks: int = 2  # view B's own SpecAugment
    time_masks: int = 2
    freq_width: int = 15
    time_width: Union[int, float] = 0.05  # a float is a fraction of the utterance, an integer a number of frames

    def check(self, key: str, env: ObjectiveEnv) -> None:
        """Every key; the error names the full key and the allowed values."""
        super().check(key, env)
        check_choice(self.mode, f"{key}.mode", ("simclr", "byol"))
        check_int(self.proj_dim, f"{key}.proj_dim", 1)
        check_number(self.temperature, f"{key}.temperature", 0.0, 100.0, low_open=True)
        check_int(self.frames_per_utt, f"{key}.frames_per_utt", 1)
        check_choice(self.negatives, f"{key}.negatives", NEGATIVES)
        check_int(self.exclude_window, f"{key}.exclude_window", 0)
        check_number(self.ema_decay, f"{key}.ema_decay", 0.0, 1.0, high_open=True)
        if self.noise_snr_db is not None:
            check_number(self.noise_snr_db, f"{key}.noise_snr_db (null = no noise)", -50.0, 100.0)
        check_int(self.freq_masks, f"{key}.freq_masks", 0)
        check_int(self.time_masks, f"{key}.time_masks", 0)
        check_int(self.freq_width, f"{key}.freq_width", 0, env.n_features)
        tw = self.time_width
        if isinstance(tw, float):
            check_number(tw, f"{key}.time_width (a float is a fraction of the utterance)", 0.0, 1.0)
        else:
            check_int(tw, f"{key}.time_width (an integer is a number of frames; or a float fraction in [0, 1])", 0)


@register_objective("token_contrastive", TokenContrastiveConfig)
def build_token_contrastive(cfg: TokenContrastiveConfig, env: ObjectiveEnv, key: str) -> List[Objective]:
    term = TokenContrastive("token_contrastive", width=env.encoded_width, block=cfg, **cfg.schedule())
    if term.mode == "byol":
        term.attach_target(env.encoder)
    return [term]
