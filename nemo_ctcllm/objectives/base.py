"""The objective interface, its registry and the one function that composes the loss.

An *objective* is an ``nn.Module`` that reads one training/validation batch (a :class:`StepContext`) and
returns ``(loss, stats)``: an unweighted scalar loss and a dict of detached scalars to log. Its YAML block
under ``model.objectives.<name>`` carries ``weight``, ``warmup_steps`` and ``every_n_steps`` (shared by every
objective, read by :func:`compose_loss`) plus its own keys. A new objective is one file that subclasses
:class:`Objective`, decorates its builder with :func:`register_objective`, and one YAML block.

A block may build several *terms* (e.g. one per intermediate CTC head); each term is one Objective module
with its own name, weight and warm-up, and is logged under ``train/<name>``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_ctcllm.config import (  # noqa: F401  (re-exported until every objective imports nemo_ctcllm.config)
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_weight,
    merge_block,
)

if TYPE_CHECKING:  # pragma: no cover
    from nemo_ctcllm.models.ctc_llm_bpe import EncDecCTCLLMModelBPE

Stats = Dict[str, torch.Tensor]

# Keys every objective block accepts; read by compose_loss and the builders, never by the objective itself.
COMMON_KEYS = {"enabled": True, "weight": 1.0, "warmup_steps": 0, "every_n_steps": 1}


@dataclass
class StepContext:
    """What one batch offers to every objective. Tensors keep their NeMo layouts.

    Attributes:
        model: the model (read its tokenizer, decoder, loss; never mutate it here).
        signal: raw audio [B, S]; signal_len: [B].
        encoded: final encoder output [B, D, T]; encoded_len: [B].
        log_probs: final CTC head log-probabilities [B, T, V+1] (blank last, as NeMo).
        targets: padded ASR token ids [B, U]; target_len: [B].
        layers: captured encoder layer outputs, keyed by 1-based block index k ("after block k"):
            k -> (output [B, D, T], length [B]).
        selfcond_log_probs: intermediate-head log-probs already computed inside the encoder by
            self-conditioning hooks, keyed by block index: k -> [B, T, V+1].
        compute_wer: whether objectives should also report WER this step (costly decoding).
        labelled: [B] bool, rows that have a transcript, or None when every row has one. Only set when an
            enabled objective uses unlabelled rows (semi-supervised training): a row with an empty target
            (``target_len == 0``, a manifest line without ``text``) is then unlabelled. Objectives that need
            a reference never see unlabelled rows (:func:`compose_loss` hands them :func:`labelled_view`).
        cache: per-step results shared between objectives (e.g. the N-best), keyed by their settings.
    """

    model: "EncDecCTCLLMModelBPE"
    signal: torch.Tensor
    signal_len: torch.Tensor
    encoded: torch.Tensor
    encoded_len: torch.Tensor
    log_probs: torch.Tensor
    targets: torch.Tensor
    target_len: torch.Tensor
    layers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    selfcond_log_probs: Dict[int, torch.Tensor] = field(default_factory=dict)
    compute_wer: bool = False
    labelled: Optional[torch.Tensor] = None
    cache: Dict[Any, Any] = field(default_factory=dict)


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
        signal=pick(ctx.signal), signal_len=pick(ctx.signal_len),
        encoded=pick(ctx.encoded), encoded_len=pick(ctx.encoded_len), log_probs=pick(ctx.log_probs),
        targets=pick(ctx.targets), target_len=pick(ctx.target_len),
        layers={k: (pick(out), pick(n)) for k, (out, n) in ctx.layers.items()},
        selfcond_log_probs={k: pick(lp) for k, lp in ctx.selfcond_log_probs.items()},
        labelled=None, cache={},
    )


class Objective(torch.nn.Module):
    """Base class of every loss term.

    Subclasses set ``name`` (unique term name, used in logs), ``weight`` and ``warmup_steps`` through
    ``super().__init__``, may list the encoder blocks they need in ``capture_blocks`` (1-based), and
    implement ``forward(ctx) -> (loss, stats)`` (``(None, {})``: the term does not run this step and is not
    logged). ``needed_at_inference`` marks modules that change the
    encoder's forward pass (self-conditioning) and must survive export. ``uses_unlabelled`` marks an
    objective that reads rows without a transcript (``ctx.labelled``); every other objective is handed the
    labelled rows only (see :func:`compose_loss`). ``tp_collective`` marks an objective whose forward runs
    collectives of the LLM's tensor-parallel group: it is called every step, also on a batch with no row
    for it (then it must return a zero loss), so that the ranks of the group stay in step.
    """

    needed_at_inference: bool = False
    uses_unlabelled: bool = False
    tp_collective: bool = False
    every_n_steps: int = 1  # set from the block by build_objectives; read by compose_loss

    def __init__(self, name: str, weight: float, warmup_steps: int = 0, capture_blocks: Optional[List[int]] = None):
        super().__init__()
        self.name = name
        self.weight = float(weight)
        self.warmup_steps = int(warmup_steps)
        self.capture_blocks = list(capture_blocks or [])

    def forward(self, ctx: StepContext) -> Tuple[torch.Tensor, Stats]:  # pragma: no cover - interface
        raise NotImplementedError

    def effective_weight(self, step: int) -> float:
        """weight, ramped linearly from 0 over ``warmup_steps`` optimizer steps."""
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, (step + 1) / self.warmup_steps)


Builder = Callable[[DictConfig, "EncDecCTCLLMModelBPE", str], List[Objective]]
_REGISTRY: Dict[str, Tuple[Builder, Mapping[str, object]]] = {}


def register_objective(name: str, defaults: Mapping[str, object]):
    """Register ``builder(block, model, key) -> [Objective, ...]`` for ``model.objectives.<name>``.

    ``defaults`` lists the block's own keys with their defaults; any other key is a config error.
    """

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise RuntimeError(f"objective '{name}' registered twice")
        _REGISTRY[name] = (builder, dict(defaults))
        return builder

    return wrap


def registered_objectives() -> List[str]:
    return sorted(_REGISTRY)


def read_block(block: Optional[DictConfig], name: str, key: str) -> DictConfig:
    """Merge a user block over the objective's defaults; reject unknown keys and bad common values."""
    _, defaults = _REGISTRY[name]
    merged = merge_block(block, {**COMMON_KEYS, **defaults}, key)
    check_weight(merged.weight, f"{key}.weight")
    if not isinstance(merged.warmup_steps, int) or merged.warmup_steps < 0:
        raise ConfigError(f"{key}.warmup_steps must be an integer >= 0, got {merged.warmup_steps!r}")
    check_int(merged.every_n_steps, f"{key}.every_n_steps", 1)
    return merged


def build_objectives(cfg: Optional[DictConfig], model: "EncDecCTCLLMModelBPE") -> torch.nn.ModuleDict:
    """Build every enabled objective of ``model.objectives`` (``ctc_final`` is always present)."""
    import nemo_ctcllm.objectives  # noqa: F401  (registers the built-in objectives)

    user = OmegaConf.create({}) if cfg is None else cfg
    unknown = sorted(set(user.keys()) - set(_REGISTRY))
    if unknown:
        raise ConfigError(
            f"model.objectives: unknown objective(s) {unknown}; registered objectives: {registered_objectives()}"
        )
    terms = torch.nn.ModuleDict()
    for name in registered_objectives():
        if name != "ctc_final" and name not in user:
            continue
        key = f"model.objectives.{name}"
        block = read_block(user.get(name), name, key)
        if name == "ctc_final" and not block.enabled:
            raise ConfigError(f"{key}.enabled: the final CTC head is the model; set {key}.weight: 0 instead")
        if not block.enabled:
            continue
        builder, _ = _REGISTRY[name]
        for term in builder(block, model, key):
            if term.name in terms:
                raise ConfigError(f"{key}: term name '{term.name}' is already used by another objective")
            term.every_n_steps = block.every_n_steps
            terms[term.name] = term
    total_weight = sum(t.weight for t in terms.values())
    if total_weight <= 0.0:
        raise ConfigError(
            "model.objectives: every loss weight is 0, so nothing would be trained; "
            "set model.objectives.ctc_final.weight (default 1.0) or another weight > 0"
        )
    return terms


def compose_loss(
    terms: torch.nn.ModuleDict, ctx: StepContext, step: int, prefix: str
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The one place where the total loss is made: ``sum_i w_i(step) * loss_i``.

    Every term is evaluated (also at weight 0 during warm-up, so that its curve is logged; in training only on
    steps with ``step % every_n_steps == 0``, which amortises an expensive objective), its unweighted
    loss logged detached under ``<prefix>/<name>``, its current weight under ``<prefix>/weight/<name>`` and
    its stats under ``<prefix>/<name>_<stat>``.

    Labelled and unlabelled rows: a term with ``uses_unlabelled`` gets the whole batch; every other term gets
    :func:`labelled_view` (the batch itself when every row is labelled, so a labelled batch is computed exactly
    as before). A term with no row to read this step is skipped (not logged; a ``tp_collective`` term is still
    called, see :class:`Objective`), as is a term that returns ``(None, {})``; a skipped term adds
    ``0 * sum(its parameters)`` so that data-parallel gradient reduction still sees every parameter.
    Returns (total loss, logs).
    """
    total = ctx.log_probs.new_zeros(())
    logs: Dict[str, torch.Tensor] = {}
    labelled = labelled_view(ctx)
    if ctx.labelled is not None:
        logs[f"{prefix}/labelled_rows"] = ctx.labelled.sum().float()
    for name, term in terms.items():
        if ctx.model.training and step % term.every_n_steps != 0:  # same step on every rank: TP groups stay in step
            loss, stats = None, {}
        else:
            view = ctx if term.uses_unlabelled else labelled
            empty = view.log_probs.shape[0] == 0  # no row for it: a collective term still runs
            loss, stats = term(view) if not empty or term.tp_collective else (None, {})
            loss = None if empty else loss
        if loss is None:  # nothing this step (every_n_steps, no row, the term's own choice): not added, not logged
            params = [p.sum() for p in term.parameters() if p.requires_grad]
            if params:  # but every parameter stays in the graph for data-parallel gradient reduction
                total = total + 0.0 * torch.stack(params).sum()
            continue
        w = term.effective_weight(step)
        if w != 0.0:
            total = total + w * loss
        logs[f"{prefix}/{name}"] = loss.detach()
        if term.warmup_steps > 0:
            logs[f"{prefix}/weight/{name}"] = torch.tensor(w)
        for key, value in stats.items():
            logs[f"{prefix}/{name}_{key}"] = value.detach() if torch.is_tensor(value) else torch.tensor(value)
    return total, logs
