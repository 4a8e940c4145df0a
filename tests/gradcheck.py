"""Directional finite-difference checks of an objective's gradient, one input ("path") at a time.

A test that only asks for a non-zero encoder gradient passes when one of several paths of a term is cut (a stray
``.detach()``); comparing the autograd gradient with central differences of the loss itself does not: a cut path
still moves the loss, but no longer its gradient. Each path is checked alone, so a failure names the path.
"""

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
from obj_tp_worker import TEXTS, asr_batch

from nemo_ctcllm.objectives import StepContext


def central_difference(loss_fn: Callable[[], torch.Tensor], x: torch.Tensor, u: torch.Tensor, eps: float):
    """(L(x + eps u) - L(x - eps u)) / (2 eps) as a float64 scalar; ``x`` is perturbed in place and restored."""
    saved = x.detach().clone()
    with torch.no_grad():
        x.add_(eps * u)
        plus = loss_fn().double()
        x.copy_(saved - eps * u)
        minus = loss_fn().double()
        x.copy_(saved)
    return (plus - minus) / (2 * eps)


def assert_gradient_matches_finite_differences(
    loss_fn: Callable[[], torch.Tensor],
    paths: Dict[str, torch.Tensor],
    eps: float,
    atol: float,
    rtol: float,
    directions: int = 3,
    seed: int = 0,
) -> None:
    """For every path alone: autograd's directional derivative sum(grad * u) equals the central difference of
    ``loss_fn`` along u, for ``directions`` random unit directions u and for u = grad / |grad|.

    loss_fn() -> scalar loss, reading the tensors of ``paths`` ({name: leaf or parameter with requires_grad},
    float64 where the objective allows it); it must be deterministic (re-seed any random draw inside it).
    Also asserts that every path moves the loss (a central difference above 10 * atol), so that the check
    cannot pass because the path does not matter.
    """
    names, tensors = list(paths), list(paths.values())
    loss = loss_fn()
    grads = torch.autograd.grad(loss, tensors, allow_unused=True) if loss.requires_grad else [None] * len(tensors)
    g = torch.Generator().manual_seed(seed)
    for name, x, grad in zip(names, tensors, grads):
        grad = torch.zeros_like(x) if grad is None else grad  # None: the path is cut entirely
        units = [torch.randn(x.shape, dtype=x.dtype, generator=g) for _ in range(directions)]
        units = [u / u.norm() for u in units]
        if grad.abs().max() > 0:
            units.append(grad / grad.norm())
        numeric = []
        for k, u in enumerate(units):
            fd = central_difference(loss_fn, x, u, eps)
            analytic = (grad * u).sum().double()
            numeric.append(abs(float(fd)))
            torch.testing.assert_close(
                analytic, fd, atol=atol, rtol=rtol, msg=lambda m, k=k: f"path '{name}', direction {k}: {m}"
            )
        assert max(numeric) > 10 * atol, f"path '{name}' does not move the loss: {numeric}"


def peaked_context(model, checkpoint: Optional[str] = None, lead: float = 5.0) -> Tuple[StepContext, torch.Tensor]:
    """A StepContext of ``model`` (3 utterances, transcripts from ``TEXTS``) whose final-head posteriors are a
    float64 leaf [3, 12, V+1]: random logits plus ``lead`` on a random path of pieces and blanks, so every frame's
    argmax leads by about ``lead`` - 2.4 nats and a finite-difference step never moves the greedy segmentation
    of the bridge. ``checkpoint``: the LLM that ``ctx.env.llm()`` returns is that folder loaded in float64.

    Returns (ctx, log_probs); the objective reads ``ctx.log_probs``, the test perturbs ``log_probs`` in place.
    """
    from nemo_ctcllm.llm import LLMHost

    texts, lengths = TEXTS[3:6], torch.tensor([12, 9, 7])
    with torch.no_grad():
        ctx = model.step_context(asr_batch(model, texts), compute_wer=False)
    C = ctx.log_probs.shape[2]  # V+1, blank last
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, C, dtype=torch.float64, generator=g)  # [B, T, V+1]
    path = torch.randint(1, C, (3, 12), generator=g)  # [B, T]: pieces and blank, never piece 0 (<unk>)
    logits.scatter_add_(2, path[..., None], torch.full((3, 12, 1), lead, dtype=torch.float64))
    log_probs = logits.log_softmax(-1).requires_grad_(True)  # [B, T, V+1]
    env = ctx.env
    if checkpoint is not None:
        host = LLMHost(checkpoint, tp_size=1, params_dtype=torch.float64)
        env = dataclasses.replace(env, llm=lambda: host)
    return dataclasses.replace(ctx, env=env, log_probs=log_probs, encoded_len=lengths, cache={}), log_probs
