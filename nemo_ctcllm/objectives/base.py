"""The objective interface, its registry and the one function that composes the loss.

An *objective* is an ``nn.Module`` that reads one training/validation batch (a :class:`StepContext`) and
returns ``(loss, stats)``: an unweighted scalar loss and a dict of detached scalars to log. Its YAML block
under ``model.objectives.<name>`` is declared once, as a dataclass subclassing :class:`ObjectiveConfig`
(the keys, their defaults and ``check``); every block also takes ``enabled``, ``weight``, ``warmup_steps``
and ``every_n_steps``, which reach the term through its constructor and are read by :func:`compose_loss`, and
``weight_mode`` (``share``: the weight tracks a target gradient share, :func:`update_share_weight`).
A new objective is one file that subclasses :class:`Objective`, declares its block, decorates its builder
with :func:`register_objective`, and one YAML block.

Objectives never see the model: the builders and every step get an :class:`ObjectiveEnv` (the tokenizer, the
widths, the LLM getter, the CTC loss/WER, the modules an extra encoder pass needs); what a term needs from the
model's life cycle (self-conditioning hooks and their stash, an EMA update before a step, the heads it offers
to other terms) are methods of :class:`Objective` that the model calls.

A block may build several *terms* (e.g. one per intermediate CTC head); each term is one Objective module
with its own name, weight and warm-up, and is logged under ``train/<name>``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_ctcllm.config import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_weight,
    read_dataclass,
)

Stats = Dict[str, torch.Tensor]
Hook = Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]  # a torch forward hook


@dataclass(frozen=True)
class ObjectiveEnv:
    """What objectives may use of the model, at construction (the builders) and on every step (``ctx.env``).

    Objectives read these fields and call the callables; they never hold or mutate the model. Modules here are
    the model's own (shared, not copied): a term runs them (an extra encoder pass, a shared CTC head) or
    copies them (an EMA target), and keeps no reference to them in its module tree.
    """

    tokenizer: Any  # the ASR tokenizer (NeMo TokenizerSpec: ids_to_text, ids_to_tokens, vocab_size)
    vocab_size: int  # V, the ASR pieces; CTC heads have V+1 classes (blank last)
    vocabulary: List[str]  # the final CTC head's vocabulary (for new heads)
    encoded_width: int  # D of ctx.encoded and of captured blocks (encoder d_model, or its out_proj)
    n_features: Optional[int]  # preprocessor feature bins, None when the preprocessor config does not say
    interctc_blocks: Tuple[int, ...]  # encoder blocks with an intermediate CTC head (what head_block may name)
    llm_checkpoint: Optional[str]  # model.llm.checkpoint
    llm: Callable[[], Any]  # the frozen LLM host (nemo_ctcllm.llm.LLMHost), built on the first call
    ctc_loss: Callable[..., torch.Tensor]  # NeMo CTCLoss(log_probs=, targets=, input_lengths=, target_lengths=)
    ctc_wer: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (log_probs, lengths, targets,
    #   target_len) -> (wer, errors, words), the model's own WER metric (its decoding settings)
    final_head: torch.nn.Module  # the final CTC decoder, x [B, D, T] -> log-probs [B, T, V+1]
    encoder: torch.nn.Module  # the online encoder (extra passes, EMA source); blocks in encoder.layers
    preprocessor: Callable  # (input_signal=[B, S], length=[B]) -> features [B, F, T'], lengths [B]
    spec_augment: Optional[Callable]  # the model's SpecAugment (input_spec=, length=), or None
    model_guid: str  # the AccessMixin guid of the model's encoder-capture registry

    def llm_hidden_size(self, key: str) -> int:
        """The LLM's width, read from ``model.llm.checkpoint``'s config.json (for ``<key>.llm_hidden_size: null``)."""
        if not self.llm_checkpoint:
            raise ConfigError(
                f"{key}.llm_hidden_size is null, so it is read from the LLM folder, but model.llm.checkpoint is not "
                f"set: point model.llm.checkpoint to a local Hugging Face LLaMA folder (or set {key}.llm_hidden_size)"
            )
        from nemo_ctcllm.llm.convert import LLMCheckpointError, read_llama_spec

        try:
            return read_llama_spec(self.llm_checkpoint).hidden_size
        except (LLMCheckpointError, OSError) as e:
            raise ConfigError(f"model.llm.checkpoint: cannot read the LLM config needed by {key}: {e}") from e


@dataclass
class StepContext:
    """What one batch offers to every objective. Tensors keep their NeMo layouts.

    Attributes:
        env: what objectives may use of the model (:class:`ObjectiveEnv`).
        signal: raw audio [B, S]; signal_len: [B].
        encoded: final encoder output [B, D, T]; encoded_len: [B].
        log_probs: final CTC head log-probabilities [B, T, V+1] (blank last, as NeMo).
        targets: padded ASR token ids [B, U]; target_len: [B].
        layers: captured encoder layer outputs, keyed by 1-based block index k ("after block k"):
            k -> (output [B, D, T], length [B]).
        selfcond_log_probs: intermediate-head log-probs already computed inside the encoder by
            self-conditioning hooks, keyed by block index: k -> [B, T, V+1].
        heads: the intermediate CTC heads the terms offer (:meth:`Objective.ctc_heads`), block k -> head.
        compute_wer: whether objectives should also report WER this step (costly decoding).
        labelled: [B] bool, rows that have a transcript, or None when every row has one. Only set when an
            enabled objective uses unlabelled rows (semi-supervised training): a row with an empty target
            (``target_len == 0``, a manifest line without ``text``) is then unlabelled. Objectives that need
            a reference never see unlabelled rows (:func:`compose_loss` hands them :func:`labelled_view`).
        training: the model is training (not validating/testing).
        step: the optimizer step (``global_step``).
        cache: per-step results shared between objectives (e.g. the N-best), keyed by their settings.
    """

    env: ObjectiveEnv
    signal: torch.Tensor
    signal_len: torch.Tensor
    encoded: torch.Tensor
    encoded_len: torch.Tensor
    log_probs: torch.Tensor
    targets: torch.Tensor
    target_len: torch.Tensor
    layers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    selfcond_log_probs: Dict[int, torch.Tensor] = field(default_factory=dict)
    heads: Dict[int, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    compute_wer: bool = False
    labelled: Optional[torch.Tensor] = None
    training: bool = False
    step: int = 0
    cache: Dict[Any, Any] = field(default_factory=dict)

    def head_log_probs(self, block: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T, V+1], lengths [B]) of the final CTC head (block None) or of the intermediate head at
        ``block``: taken from self-conditioning when the encoder computed it, else run on the captured output."""
        if block is None:
            return self.log_probs, self.encoded_len
        output, length = self.layers[block]  # [B, D, T], [B]
        stashed = self.selfcond_log_probs.get(block)
        return (stashed if stashed is not None else self.heads[block](output)), length


def labelled_view(ctx: StepContext) -> StepContext:
    """The batch restricted to its labelled rows (``ctx`` itself when every row is labelled; may have 0 rows).

    Every per-row tensor (signal, encoder output, posteriors, targets, captured layers) is indexed by the
    labelled rows, which keeps the graph: gradients of a restricted loss reach the full batch's encoder.
    """
    if ctx.labelled is None or bool(ctx.labelled.all()):
        return ctx
    rows = ctx.labelled.nonzero().squeeze(1)  # [B'], possibly empty
    pick = lambda x: x.index_select(0, rows.to(x.device))  # noqa: E731
    return dataclasses.replace(
        ctx,
        signal=pick(ctx.signal),
        signal_len=pick(ctx.signal_len),
        encoded=pick(ctx.encoded),
        encoded_len=pick(ctx.encoded_len),
        log_probs=pick(ctx.log_probs),
        targets=pick(ctx.targets),
        target_len=pick(ctx.target_len),
        layers={k: (pick(out), pick(n)) for k, (out, n) in ctx.layers.items()},
        selfcond_log_probs={k: pick(lp) for k, lp in ctx.selfcond_log_probs.items()},
        labelled=None,
        cache={},
    )


class Objective(torch.nn.Module):
    """Base class of every loss term.

    Subclasses set ``name`` (unique term name, used in logs), ``weight``, ``warmup_steps`` and
    ``every_n_steps`` through ``super().__init__``, may list the encoder blocks they need in ``capture_blocks``
    (1-based), and implement ``forward(ctx) -> (loss, stats)`` (``(None, {})``: the term does not run this step
    and is not logged). ``needed_at_inference`` marks modules that change the encoder's forward pass
    (self-conditioning) and must survive export. ``uses_unlabelled`` marks an objective that reads rows without
    a transcript (``ctx.labelled``); every other objective is handed the labelled rows only (see
    :func:`compose_loss`). ``tp_collective`` marks an objective whose forward or backward runs collectives
    (the LLM's tensor-parallel group, or rows gathered over the data-parallel ranks): it is called every step on
    every rank, also on a view with no row for it, and must then still take part in every collective and return a
    finite loss in the graph of those collectives (the TP group's loss where all TP ranks back-propagate one
    loss, a zero otherwise), so that no peer waits for this rank.

    Life-cycle hooks, called by the model (the defaults do nothing): :meth:`encoder_hooks` (installed once),
    :meth:`pop_stash` (after every encoder forward), :meth:`ctc_heads` (heads offered to other terms) and
    :meth:`before_training_step` (before every training batch's forward).
    """

    needed_at_inference: bool = False
    uses_unlabelled: bool = False
    tp_collective: bool = False
    share: Optional["ShareTarget"] = None  # weight_mode: share (set by build_objectives): weight tracks a grad share

    def __init__(
        self,
        name: str,
        weight: float,
        warmup_steps: int = 0,
        capture_blocks: Optional[List[int]] = None,
        every_n_steps: int = 1,
    ):
        super().__init__()
        self.name = name
        self.weight = float(weight)
        self.warmup_steps = int(warmup_steps)
        self.every_n_steps = int(every_n_steps)  # read by compose_loss
        self.capture_blocks = list(capture_blocks or [])

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:  # pragma: no cover - interface
        raise NotImplementedError

    def effective_weight(self, step: int) -> float:
        """weight, ramped linearly from 0 over ``warmup_steps`` optimizer steps."""
        return self.weight * self.ramp(step)

    def ramp(self, step: int) -> float:
        """The warm-up factor min(1, (step + 1) / warmup_steps) (1 without warm-up)."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    # ------------------------------------------------------------------ life-cycle hooks
    def encoder_hooks(self, env: ObjectiveEnv) -> Dict[int, Hook]:
        """Forward hooks to install on encoder blocks, block k (1-based) -> hook; installed once by the model."""
        return {}

    def pop_stash(self) -> Dict[int, torch.Tensor]:
        """Intermediate-head log-probs this term's encoder hooks computed in the last (captured) encoder forward,
        block k -> [B, T, V+1]; cleared by the call. The model hands them to every term as
        ``ctx.selfcond_log_probs``."""
        return {}

    def ctc_heads(self, env: ObjectiveEnv) -> Dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """The intermediate CTC heads this term trains, block k -> head (x [B, D, T] -> log-probs [B, T, V+1]);
        other terms read them through ``ctx.heads`` / :meth:`StepContext.head_log_probs`."""
        return {}

    def before_training_step(self, env: ObjectiveEnv, optimizer_updates: int) -> None:
        """Called before every training batch's encoder forward; ``optimizer_updates`` counts the optimizer
        steps that changed the weights (steps skipped for a non-finite loss excluded)."""


@dataclass
class ObjectiveConfig:
    """The keys every objective block takes; an objective's block subclasses this dataclass with its own keys
    and defaults (the one declaration of them) and extends :meth:`check`."""

    enabled: bool = True
    weight: float = 1.0
    warmup_steps: int = 0  # the weight ramps linearly from 0 over this many optimizer steps
    every_n_steps: int = 1  # k: the term runs on training steps with global_step % k == 0 (always in validation)
    # fixed: `weight` as given. share: `weight` is the start; on grad-share logging steps it is moved so that the
    # term's share of the encoder gradient tracks target_share (update_share_weight), within [min_weight, max_weight]
    weight_mode: str = "fixed"
    target_share: Optional[float] = None  # in (0, 1); share mode only
    min_weight: float = 0.001
    max_weight: float = 10.0
    share_smoothing: float = 0.3  # β in (0, 1]: log w <- (1 - β) log w + β log w*

    def check(self, key: str, env: ObjectiveEnv) -> None:
        """Validate the block (``key``: ``model.objectives.<name>``); a bad value raises a ConfigError naming it."""
        check_bool(self.enabled, f"{key}.enabled")
        check_weight(self.weight, f"{key}.weight")
        check_int(self.warmup_steps, f"{key}.warmup_steps", 0)
        check_int(self.every_n_steps, f"{key}.every_n_steps", 1)
        check_choice(self.weight_mode, f"{key}.weight_mode", ["fixed", "share"])
        if self.weight_mode == "fixed":
            if self.target_share is not None:
                raise ConfigError(
                    f"{key}.target_share is set but {key}.weight_mode is fixed: set {key}.weight_mode: share "
                    "to track it, or remove target_share"
                )
            return
        if self.target_share is None:
            raise ConfigError(f"{key}.weight_mode is share, so {key}.target_share must be set (a number in (0, 1))")
        check_number(self.target_share, f"{key}.target_share", 0.0, 1.0, low_open=True, high_open=True)
        check_number(self.min_weight, f"{key}.min_weight", 0.0, 100.0, low_open=True)
        check_weight(self.max_weight, f"{key}.max_weight")
        if self.min_weight > self.max_weight:
            raise ConfigError(f"{key}.min_weight ({self.min_weight}) must be <= {key}.max_weight ({self.max_weight})")
        check_number(self.share_smoothing, f"{key}.share_smoothing", 0.0, 1.0, low_open=True)

    def share_target(self, key: str) -> Optional["ShareTarget"]:
        """The checked share-mode settings of a term of this block (None in fixed mode)."""
        if self.weight_mode != "share":
            return None
        return ShareTarget(key, self.target_share, self.min_weight, self.max_weight, self.share_smoothing)

    def schedule(self) -> Dict[str, Any]:
        """The constructor arguments of :class:`Objective` that come from the common keys."""
        return {"weight": self.weight, "warmup_steps": self.warmup_steps, "every_n_steps": self.every_n_steps}


@dataclass(frozen=True)
class ShareTarget:
    """``weight_mode: share`` of one term: its weight tracks ``target`` share of the encoder gradient norms."""

    key: str  # model.objectives.<name>, for messages
    target: float  # s* in (0, 1)
    min_weight: float  # > 0 (the update is in log space)
    max_weight: float
    smoothing: float  # β in (0, 1]


def update_share_weight(weight: float, ramp: float, norm: float, others: float, share: ShareTarget) -> float:
    """One share-mode update of a term's base weight w (the weight that warm-up scales).

    ``norm`` = |∇(w·r·L)| was measured at the effective weight w·r (r = ``ramp``, the warm-up factor), ``others`` =
    Σ_j |∇L_j| over the other terms, as measured. Since |∇(w·L)| = w·|∇L|, the base weight that gives share s*
    at full ramp with the others fixed solves w*·n / (w*·n + others) = s* with n = norm / (w·r):

        w* = s* / (1 - s*) · others · w · r / norm
        log w <- clip((1 - β) log w + β log w*, log min_weight, log max_weight)

    w is returned unchanged when either norm is 0 or not finite (the term or every other term did not reach the
    encoder on that step)."""
    if not (0.0 < norm < math.inf and 0.0 < others < math.inf):
        return weight
    s = share.target
    w_star = s / (1.0 - s) * others * weight * ramp / norm
    log_w = (1.0 - share.smoothing) * math.log(weight) + share.smoothing * math.log(w_star)
    return min(share.max_weight, max(share.min_weight, math.exp(log_w)))


Builder = Callable[[Any, ObjectiveEnv, str], List[Objective]]
_REGISTRY: Dict[str, Tuple[Builder, Type[ObjectiveConfig]]] = {}


def register_objective(name: str, schema: Type[ObjectiveConfig] = ObjectiveConfig):
    """Register ``builder(cfg, env, key) -> [Objective, ...]`` for ``model.objectives.<name>``, whose block is
    declared by ``schema`` (a dataclass subclassing :class:`ObjectiveConfig`); ``cfg`` is the checked block."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise RuntimeError(f"objective '{name}' registered twice")
        _REGISTRY[name] = (builder, schema)
        return builder

    return wrap


def registered_objectives() -> List[str]:
    return sorted(_REGISTRY)


def objective_schema(name: str) -> Type[ObjectiveConfig]:
    """The declared block of a registered objective."""
    return _REGISTRY[name][1]


def build_objectives(
    cfg: Optional[DictConfig], env: ObjectiveEnv
) -> Tuple[torch.nn.ModuleDict, Dict[str, Dict[str, Any]]]:
    """Build every enabled objective of ``model.objectives`` (``ctc_final`` is always present).

    Returns (terms, filled): ``filled[name]`` holds the block values that were read from elsewhere
    (``llm_hidden_size: null`` -> the LLM folder's width), for the model to write back into its config so that
    a restored ``.nemo`` builds its modules without the LLM. The built-in objectives are registered by
    importing ``nemo_ctcllm.objectives`` (which importing this module does first).
    """
    user = OmegaConf.create({}) if cfg is None else cfg
    unknown = sorted(set(user.keys()) - set(_REGISTRY))
    if unknown:
        raise ConfigError(
            f"model.objectives: unknown objective(s) {unknown}; registered objectives: {registered_objectives()}"
        )
    terms = torch.nn.ModuleDict()
    filled: Dict[str, Dict[str, Any]] = {}
    for name in registered_objectives():
        if name != "ctc_final" and name not in user:
            continue
        key = f"model.objectives.{name}"
        builder, schema = _REGISTRY[name]
        block = read_dataclass(user.get(name), schema, key)
        if name == "ctc_final" and not block.enabled:
            raise ConfigError(f"{key}.enabled: the final CTC head is the model; set {key}.weight: 0 instead")
        if not block.enabled:
            continue  # its keys' types are read above; its resources (e.g. mlm.model_dir) are not required
        block.check(key, env)
        if getattr(block, "llm_hidden_size", 0) is None:
            block = dataclasses.replace(block, llm_hidden_size=env.llm_hidden_size(key))
            filled[name] = {"llm_hidden_size": block.llm_hidden_size}
        share = block.share_target(key)
        if name == "ctc_final" and share is not None:
            raise ConfigError(
                f"{key}.weight_mode: share is not allowed on ctc_final, the reference the other terms' shares "
                "are measured against; set weight_mode: share on the other objectives"
            )
        for term in builder(block, env, key):
            if term.name in terms:
                raise ConfigError(f"{key}: term name '{term.name}' is already used by another objective")
            if share is not None and not share.min_weight <= term.weight <= share.max_weight:
                raise ConfigError(
                    f"{key}.weight: term {term.name} starts at weight {term.weight}, outside "
                    f"[{key}.min_weight, {key}.max_weight] = [{share.min_weight}, {share.max_weight}]"
                )
            term.share = share
            terms[term.name] = term
    total_weight = sum(t.weight for t in terms.values())
    if total_weight <= 0.0:
        raise ConfigError(
            "model.objectives: every loss weight is 0, so nothing would be trained; "
            "set model.objectives.ctc_final.weight (default 1.0) or another weight > 0"
        )
    targets = {t.name: t.share.target for t in terms.values() if t.share is not None}
    if sum(targets.values()) >= 1.0:
        keys = sorted({f"{t.share.key}.target_share" for t in terms.values() if t.share is not None})
        raise ConfigError(
            f"{', '.join(keys)}: the share-mode terms' targets {targets} sum to {sum(targets.values()):g}, but "
            "must sum to less than 1 (ctc_final and the fixed-weight terms keep the rest)"
        )
    return terms, filled


def compose_loss(
    terms: torch.nn.ModuleDict,
    ctx: StepContext,
    step: int,
    prefix: str,
    weighted: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The one place where the total loss is made: ``sum_i w_i(step) * loss_i``.

    Every term is evaluated (also at weight 0 during warm-up, so that its curve is logged; in training only on
    steps with ``step % every_n_steps == 0``, which amortises an expensive objective), its unweighted
    loss logged detached under ``<prefix>/<name>``, its current weight (with warm-up or ``weight_mode: share``)
    under ``<prefix>/weight/<name>`` and its stats under ``<prefix>/<name>_<stat>``.

    Labelled and unlabelled rows: a term with ``uses_unlabelled`` gets the whole batch; every other term gets
    :func:`labelled_view` (the batch itself when every row is labelled, so a labelled batch is computed exactly
    as before). A term with no row to read this step is skipped (not logged), as is a term that returns
    ``(None, {})``; a skipped term adds ``0 * sum(its parameters)`` so that data-parallel gradient reduction
    still sees every parameter.

    Every rank builds the same graph (multi-process training): which terms run depends only on the step (the
    same on every rank); a ``tp_collective`` term runs also on a rank with no row for it, and its loss there is
    added (so that its backward runs the same collectives as its peers') but not logged; a term at weight 0 is
    added as ``0 * loss`` (its parameters get a zero gradient, so ``strategy: ddp`` finds none unused).
    Returns (total loss, logs). ``weighted``, when given, receives each added term's w_i * loss_i (in the graph:
    the gradient-share logging differentiates them one by one).
    """
    total = ctx.log_probs.new_zeros(())
    logs: Dict[str, torch.Tensor] = {}
    labelled = labelled_view(ctx)
    if ctx.labelled is not None:
        logs[f"{prefix}/labelled_rows"] = ctx.labelled.sum().float()
    for name, term in terms.items():
        empty = False
        if ctx.training and step % term.every_n_steps != 0:  # same step on every rank: TP groups stay in step
            loss, stats = None, {}
        else:
            view = ctx if term.uses_unlabelled else labelled
            empty = view.log_probs.shape[0] == 0  # no row for it: a collective term still runs
            loss, stats = term(view) if not empty or term.tp_collective else (None, {})
        if loss is None:  # nothing this step (every_n_steps, no row, the term's own choice): not added, not logged
            params = [p.sum() for p in term.parameters() if p.requires_grad]
            if params:  # but every parameter stays in the graph for data-parallel gradient reduction
                total = total + 0.0 * torch.stack(params).sum()
            continue
        w = term.effective_weight(step)
        total = total + w * loss  # also at w = 0 and on an empty view: the same graph (collectives) on every rank
        if weighted is not None:
            weighted[name] = w * loss
        if empty:
            continue
        logs[f"{prefix}/{name}"] = loss.detach()
        if term.warmup_steps > 0 or term.share is not None:
            logs[f"{prefix}/weight/{name}"] = on_device(w, total)
        for key, value in stats.items():
            logs[f"{prefix}/{name}_{key}"] = on_device(value, total)
    return total, logs


def on_device(value, like: torch.Tensor) -> torch.Tensor:
    """A logged value as a detached fp32 scalar on the loss's device: NeMo syncs every logged validation value over
    the ranks (``log_dict(sync_dist=True)``), and NCCL refuses a CPU tensor (gloo does not, so CPU runs never
    show it)."""
    if torch.is_tensor(value):
        return value.detach().to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(value), device=like.device)
