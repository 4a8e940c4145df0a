"""CPU compatibility shims for megatron-core 0.16 (only what the hosted LLM's forward/backward needs).

megatron-core assumes a GPU in a handful of places on the code path used by :class:`LLMHost`
(``GPTModel`` built from ``get_gpt_layer_local_spec``, tensor parallel, no sequence parallel).
On a machine without CUDA each of them raises ("Torch not compiled with CUDA enabled" / "no
NVIDIA driver"). :func:`apply_cpu_patches` replaces exactly those, and only when
``torch.cuda.is_available()`` is False. It is idempotent, patches megatron's own classes /
module attributes (never ``torch.cuda.*``), and is a no-op on a GPU machine.

Patched places (megatron/core/...):

1. ``models/common/embeddings/rotary_pos_embedding.py`` -- ``RotaryEmbedding.get_emb``
   moves ``inv_freq`` to ``torch.cuda.current_device()`` on first use. Replaced by the same
   computation that keeps ``inv_freq`` on its (CPU) device.
2. ``utils.py`` -- ``GlobalMemoryBuffer.get_tensor`` allocates the shared scratch buffer (used by
   ``DotProductAttention`` for the ``baddbmm`` of raw attention scores) on
   ``torch.cuda.current_device()``. Replaced by an allocation on the CPU.
3. ``transformer/utils.py`` -- ``get_default_causal_mask`` builds the causal mask with
   ``device="cuda"`` (``FusedScaleMaskSoftmax`` uses it when no mask is passed). The host always
   passes an explicit mask, but the patch keeps ``attention_mask=None`` callers working. It is
   rebound both in ``transformer.utils`` and in ``fusions.fused_softmax`` (which imported it by
   name).
4. ``tensor_parallel/random.py`` -- the RNG tracker: ``DotProductAttention.forward`` always
   enters ``get_cuda_rng_tracker().fork()``, whose ``CudaRNGStatesTracker`` reads/writes the CUDA
   generator state, and ``model_parallel_cuda_manual_seed`` calls ``torch.cuda.get_rng_state``.
   We install megatron's own no-op ``InferenceCudaRNGStatesTracker`` via
   ``initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)`` (its ``fork`` is a
   ``nullcontext`` and ``add`` a no-op, so ``model_parallel_cuda_manual_seed`` also works).
   This is exact for the hosted LLM: its dropout is 0, so no RNG is ever drawn in that context.
5. ``tensor_parallel/random.py`` -- ``_get_all_rng_states`` / ``_set_all_rng_states``: the activation
   recompute (``CheckpointFunction``, ``model.llm.activation_recompute``) saves and restores the CPU, CUDA and
   tracker RNG states around each recomputed layer; the CUDA one fails without a GPU. Replaced by the same
   functions without the CUDA state.

Everything else that touches CUDA in megatron is avoided by configuration rather than patched:
``use_cpu_initialization=True`` (parameter allocation), no sequence parallel / gather_output /
context parallel / CUDA graphs / fusions.
"""

from __future__ import annotations

import torch

_APPLIED = False


def _cpu_rotary_get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    """``RotaryEmbedding.get_emb`` without the move of ``inv_freq`` to the current CUDA device."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [S, D/2]
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]  # [S, 1, 1, D]


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """``GlobalMemoryBuffer.get_tensor`` allocating on the CPU instead of the current CUDA device."""
    required_len = 1
    for dim in tensor_shape:
        required_len *= dim
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < required_len:
        buf = torch.empty(required_len, dtype=dtype, device="cpu", requires_grad=False)
        self.buffer[(name, dtype)] = buf
    return buf[0:required_len].view(*tensor_shape)


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """``get_default_causal_mask`` on the CPU: [sq, sq] bool, True above the diagonal (= masked)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_get_all_rng_states():
    """``_get_all_rng_states`` without the CUDA generator (its slot is None)."""
    from megatron.core.tensor_parallel import random as mrandom

    return torch.get_rng_state(), None, mrandom.get_cuda_rng_tracker().get_states()


def _cpu_set_all_rng_states(cpu_rng_state, cuda_rng_state, cuda_rng_state_tracker) -> None:
    """``_set_all_rng_states`` without the CUDA generator."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(cpu_rng_state)
    mrandom.get_cuda_rng_tracker().set_states(cuda_rng_state_tracker)


def install_cpu_rng_tracker() -> None:
    """Make megatron's global RNG tracker the no-op inference tracker (CPU only; see item 4)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if tracker is not None and type(tracker).__name__ == "InferenceCudaRNGStatesTracker":
        return
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def apply_cpu_patches() -> bool:
    """Apply the CPU shims listed in the module docstring. Returns True if patches are active.

    Safe to call many times; does nothing (returns False) when CUDA is available.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        install_cpu_rng_tracker()  # someone may have reset the tracker in between
        return True

    from megatron.core import utils as mutils
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    rotary_pos_embedding.RotaryEmbedding.get_emb = _cpu_rotary_get_emb
    mutils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    tutils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    mrandom._get_all_rng_states = _cpu_get_all_rng_states
    mrandom._set_all_rng_states = _cpu_set_all_rng_states
    install_cpu_rng_tracker()
    _APPLIED = True
    return True
