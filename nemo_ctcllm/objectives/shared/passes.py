"""Extra passes of the model's own modules inside a training step (token_contrastive's view B, the clean pass of
the hypothesis-side objectives): the capture registry switched off, modules in eval mode where asked."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from nemo.core.classes.mixins import AccessMixin


@contextmanager
def access_disabled(guid: str) -> Iterator[None]:
    """Run extra encoder passes with the model's AccessMixin capture (``env.model_guid``) off, restored
    afterwards: nothing is registered into the InterCTC capture registry and self-conditioning hooks stash
    nothing."""
    was_enabled = AccessMixin.is_access_enabled(guid)
    AccessMixin.set_access_enabled(access_enabled=False, guid=guid)
    try:
        yield
    finally:
        AccessMixin.set_access_enabled(access_enabled=was_enabled, guid=guid)


@contextmanager
def eval_mode(*modules) -> Iterator[None]:
    """Every given module (and submodule) in eval mode, each one's own mode restored afterwards; callables that
    are not modules are left alone."""
    modes = [(m, m.training) for mod in modules if isinstance(mod, torch.nn.Module) for m in mod.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def preprocess(preprocessor, signal: torch.Tensor, length: torch.Tensor):
    """NeMo's preprocessor on a copy of the signal when it dithers: its training-mode dither adds noise to the
    caller's tensor in place, so every pass (the model's, an objective's extra views) would otherwise change the
    batch the next one reads. signal [B, S], length [B] -> features [B, F, T'], lengths [B]."""
    dither = getattr(getattr(preprocessor, "featurizer", None), "dither", 0.0)
    if getattr(preprocessor, "training", False) and dither:
        signal = signal.clone()
    return preprocessor(input_signal=signal, length=length)
