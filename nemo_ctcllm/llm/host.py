"""``LLMHost``: a frozen LLaMA-family LLM in megatron-core's ``GPTModel`` (tensor parallel).

One interface for every LLM-based training objective::

    host = LLMHost("artifacts/llm/smollm2-135m", tp_size=1)
    ids, lengths = host.tokenize(["hello world"])          # [B, L], [B]
    x = host.embed(ids)                                     # [B, L, H]
    tok_loss, loss = host.forward_embeds(x, labels, lengths=lengths)  # [B, L], scalar; grad -> x
    host.score(texts, normalize=True)                       # [B] log p(text | BOS)
    host.pooled_hidden(texts)                               # [B, H]

Parallel layout: the caller initialises ``torch.distributed`` (or lets the host create a
single-process gloo group) and megatron's ``parallel_state`` with the LLM's tensor-parallel size
N (:func:`init_model_parallel`). Each TP rank holds 1/N of the weights; every rank of a TP group
must call the host with *identical* inputs (same texts / embeddings / labels), and gets identical
outputs (losses are all-reduced inside ``vocab_parallel_cross_entropy``). Data parallelism of the
speech encoder runs across TP groups.

Loading: each rank reads only its own slices of the safetensors files, in the checkpoint's dtype
(:func:`~nemo_ctcllm.llm.convert.load_tp_shard`); host memory is this rank's parameters plus one slice.

State-dict hygiene: the megatron ``GPTModel`` is deliberately *not* registered as a submodule
(it is held with ``object.__setattr__``). An owner that stores an ``LLMHost`` as an attribute
therefore gets no LLM tensors in its ``state_dict()`` / ``parameters()`` / optimizer, DDP never
broadcasts (and so never overwrites) the per-rank TP shards, and ``owner.train()`` cannot switch
the LLM out of eval mode. The host registers no buffers; it is rebuilt from the checkpoint folder
on restore. Use ``host.gpt`` for direct access.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .compat import apply_cpu_patches
from .convert import LLMCheckpointError, build_gpt_model, check_tp_divisibility, load_tp_shard, read_llama_spec

IGNORE_INDEX = -100


def _llm_call(fn):
    """Run an LLM forward in the LLM's own parameter dtype, outside autocast (CPU and CUDA; the embedding lookup in
    ``embed`` needs no guard: autocast leaves it alone), with activation recompute when it is on.

    Under ``trainer.precision=bf16-mixed`` on a CPU, autocast would hand bf16 activations to the frozen fp32
    weights, and megatron's frozen-weight linear then fails in backward (bf16 gradient @ fp32 weight). On GPU the
    weights are bf16 already (every parameter, norms included: ``build_gpt_model``) and megatron manages its own
    precision, as in its own training, which runs without autocast. Outside autocast, activation recompute
    (megatron's ``CheckpointFunction``, which does not carry the autocast state into its backward re-run) recomputes
    exactly the forward it replaces.

    Recompute: megatron's ``TransformerBlock`` recomputes only in training mode; the host switches that one
    flag (the block's own, not its layers') on for calls that build a graph, so no-grad scoring pays nothing
    and the frozen layers stay in eval mode (dropout is 0 either way)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        block = self.gpt.decoder
        block.training = self.activation_recompute and torch.is_grad_enabled()
        try:
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return fn(self, *args, **kwargs)
        finally:
            block.training = False

    return wrapper


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_distributed() -> None:
    """Create a world-size-1 process group (gloo, free localhost port) unless one exists.

    Lets the host run in a plain script / test. Multi-process jobs (torchrun, Lightning) must
    initialise ``torch.distributed`` themselves before building the host.
    """
    if dist.is_initialized():
        return
    # an explicit fresh port, not MASTER_ADDR/MASTER_PORT: a child process (a script a test or a pipeline runs)
    # inherits those from a parent whose own group may still be listening on that port
    dist.init_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def init_model_parallel(tp_size: int) -> None:
    """Initialise megatron ``parallel_state`` with tensor-parallel size ``tp_size``.

    Requires an initialised ``torch.distributed`` (gloo on CPU, nccl on GPU). Consecutive ranks form a
    TP group; the remaining dimension is data parallel. No-op if already initialised with the
    same TP size; raises if initialised with another one or if the world size is not divisible.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised; call init_single_process_distributed() or init_process_group() first"
        )
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size != 0:
        raise ValueError(f"world size {world} is not divisible by LLM tensor-parallel size {tp_size}")
    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tp_size:
            raise ValueError(f"megatron parallel_state already initialised with TP={current}, requested {tp_size}")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)


def _ensure_rng_tracker(seed: int = 1234) -> None:
    """Make ``get_cuda_rng_tracker().fork()`` usable (DotProductAttention enters it every forward).

    CPU: megatron's no-op inference tracker (compat). GPU: add the model-parallel state if absent,
    which does not change the global CUDA RNG state (dropout is 0, so it is never drawn from).
    """
    if apply_cpu_patches():
        return
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    if name not in tracker.get_states():
        tracker.add(name, seed + 2718 + parallel_state.get_tensor_model_parallel_rank())


# ----------------------------------------------------------------------------- host


def check_tokenizer_matches(tokenizer, spec, checkpoint_dir) -> None:
    """The tokenizer in the LLM folder must index into the checkpoint's embedding table (a tokenizer copied from
    another model is the usual mistake): every id, special ones included, must be < config.vocab_size."""
    ids = {"tokens": len(tokenizer) - 1}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tokenizer, name, None) is not None:
            ids[name] = getattr(tokenizer, name)
    too_big = {k: v for k, v in ids.items() if v >= spec.vocab_size}
    if too_big:
        raise LLMCheckpointError(
            f"model.llm.checkpoint={checkpoint_dir}: the tokenizer does not match the checkpoint: it has "
            f"{len(tokenizer)} tokens (ids {too_big}) but config.json vocab_size is {spec.vocab_size}; "
            "use the tokenizer files that came with these weights"
        )


def validate_llm_folder(checkpoint_dir, tp_size: int = 1) -> None:
    """Cheap checks of an LLM folder before training starts (no weights read): config.json describes a
    supported LLaMA, its heads, query groups, FFN size and vocabulary divide by ``tp_size``, and its tokenizer
    loads and matches the vocabulary."""
    from transformers import AutoTokenizer

    spec = read_llama_spec(checkpoint_dir)
    check_tp_divisibility(spec, tp_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise LLMCheckpointError(f"cannot load the tokenizer from {checkpoint_dir}: {e}") from e
    check_tokenizer_matches(tokenizer, spec, checkpoint_dir)


def causal_padding_mask(lengths: Tensor, seq_len: int) -> Tensor:
    """Megatron attention mask [B, 1, L, L] bool, True = masked: future keys and padded keys."""
    pos = torch.arange(seq_len, device=lengths.device)
    future = pos[None, :] > pos[:, None]  # [L(q), L(k)]
    pad_key = pos[None, :] >= lengths[:, None]  # [B, L(k)]
    return (future[None] | pad_key[:, None, :])[:, None]  # [B, 1, L, L]


class LLMHost(nn.Module):
    """Frozen LLaMA-family LLM hosted in megatron-core ``GPTModel`` with tensor parallelism.

    Args:
        checkpoint_dir: local HF LLaMA folder (config.json, model.safetensors, tokenizer files).
        tp_size: tensor-parallel size. ``None``: use megatron's current TP size, or 1.
        device: default ``cuda:<current>`` when CUDA is available, else ``cpu``.
        params_dtype: default bf16 on GPU, fp32 on CPU (the checkpoint is read in its own dtype and converted
            slice by slice).
        activation_recompute: megatron's full activation recompute (one layer per checkpoint) in calls that
            build a graph: backward re-runs each layer instead of keeping its activations.
    """

    def __init__(
        self,
        checkpoint_dir: Union[str, os.PathLike],
        tp_size: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        params_dtype: Optional[torch.dtype] = None,
        activation_recompute: bool = False,
    ):
        super().__init__()
        from megatron.core import parallel_state
        from transformers import AutoTokenizer

        self.checkpoint_dir = Path(checkpoint_dir)
        spec = read_llama_spec(self.checkpoint_dir)  # validates folder / config / architecture
        cuda = torch.cuda.is_available()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        device = torch.device(device)
        params_dtype = params_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

        if tp_size is None and parallel_state.model_parallel_is_initialized():
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        tp_size = tp_size or 1
        check_tp_divisibility(spec, tp_size)
        if not dist.is_initialized():
            if tp_size != 1:
                raise RuntimeError(f"tp_size={tp_size} needs a multi-process torch.distributed job (torchrun)")
            init_single_process_distributed()
        init_model_parallel(tp_size)
        _ensure_rng_tracker()

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.checkpoint_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise LLMCheckpointError(f"cannot load the tokenizer from {self.checkpoint_dir}: {e}") from e
        check_tokenizer_matches(self.tokenizer, spec, self.checkpoint_dir)
        rank = parallel_state.get_tensor_model_parallel_rank()
        gpt = build_gpt_model(spec, tp_size, params_dtype, device, activation_recompute=activation_recompute)
        load_tp_shard(gpt, self.checkpoint_dir, spec, tp_size, rank)
        gpt.eval()
        gpt.requires_grad_(False)
        object.__setattr__(self, "gpt", gpt)  # not a registered submodule: see module docstring

        self.spec = spec
        self.activation_recompute = activation_recompute
        self.device = device
        self.dtype = params_dtype
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)

    # ------------------------------------------------------------------ properties

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def tp_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_world_size()

    def llm_parameters(self):
        """The (frozen) parameters of this rank's shard; never handed to an optimizer."""
        return self.gpt.parameters()

    # ------------------------------------------------------------------ text

    def tokenize(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False) -> tuple[Tensor, Tensor]:
        """Right-padded token ids [B, L] (long, on ``self.device``) and lengths [B]."""
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise ValueError("tokenizer has no bos/eos token")
        rows = [([bos] if add_bos else []) + r + ([eos] if add_eos else []) for r in rows]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        ids = torch.full((len(rows), max([1, *map(len, rows)])), self.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids.to(self.device), lengths.to(self.device)

    def detokenize(self, ids: Tensor, lengths: Optional[Tensor] = None) -> list[str]:
        """Texts of ids [B, L] (first ``lengths[b]`` tokens of each row), special tokens removed."""
        rows = ids.tolist()
        if lengths is not None:
            rows = [r[:n] for r, n in zip(rows, lengths.tolist())]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # ------------------------------------------------------------------ tensors

    def embed(self, ids: Tensor) -> Tensor:
        """LLM input embeddings [B, L, H] (params dtype) of ids [B, L]: vocab-parallel lookup + all-reduce."""
        return self.gpt.embedding.word_embeddings(ids.to(self.device))  # [B, L, H]

    def _decoder_inputs(self, inputs_embeds: Tensor, lengths: Optional[Tensor], attention_mask: Optional[Tensor]):
        """(decoder_input [L, B, H] in params dtype, lengths [B], mask [B, 1, L, L])."""
        B, L, _ = inputs_embeds.shape
        if lengths is None:
            lengths = attention_mask.long().sum(-1) if attention_mask is not None else torch.full((B,), L)
        lengths = lengths.to(self.device)
        x = inputs_embeds.to(self.device, self.dtype).transpose(0, 1).contiguous()  # [L, B, H]
        return x, lengths, causal_padding_mask(lengths, L)

    @_llm_call
    def forward_embeds(
        self,
        inputs_embeds: Tensor,
        labels: Tensor,
        lengths: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Next-token cross entropy of the LLM run on ``inputs_embeds``.

        Args:
            inputs_embeds: [B, L, H], right padded; gradients flow back to it.
            labels: [B, L] long, megatron convention: ``labels[:, t]`` is the target predicted at
                position t (i.e. already shifted); ``-100`` = ignored.
            lengths: [B] valid lengths (or ``attention_mask`` [B, L], 1 = valid). Default: all valid.
        Returns:
            token_loss [B, L] fp32 (0 at ignored / padded positions) and the mean over counted tokens.
        """
        x, lengths, mask = self._decoder_inputs(inputs_embeds, lengths, attention_mask)
        labels = labels.to(self.device)
        L = labels.shape[1]
        keep = (labels != IGNORE_INDEX) & (torch.arange(L, device=self.device)[None] < lengths[:, None])  # [B, L]
        # RoPE positions are 0..L-1 (right padding); GPTModel ignores position_ids given decoder_input
        position_ids = torch.arange(L, device=self.device)[None].expand_as(labels)  # [B, L]
        # GPTModel: decoder_input [L, B, H] -> logits [L, B, V/N] -> vocab_parallel_cross_entropy -> [B, L]
        token_loss = self.gpt(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=mask,
            decoder_input=x,
            labels=torch.where(keep, labels, 0),
        )
        token_loss = token_loss.float() * keep  # [B, L]
        return token_loss, token_loss.sum() / keep.sum().clamp(min=1)

    forward = forward_embeds

    @_llm_call
    def vocab_parallel_logits(self, inputs_embeds: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """This rank's vocab shard of the logits [B, L, V/N] (fp32); rows past ``lengths`` are junk."""
        x, lengths, mask = self._decoder_inputs(inputs_embeds, lengths, None)
        position_ids = torch.arange(x.shape[0], device=self.device)[None].expand(x.shape[1], -1)  # [B, L]
        logits = self.gpt(input_ids=None, position_ids=position_ids, attention_mask=mask, decoder_input=x)
        return logits.float()  # GPTModel already returns [B, L, V/N] when no labels are given

    @_llm_call
    def hidden_states(self, inputs_embeds: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """Last-layer hidden states [B, L, H] (final RMSNorm applied) for embeds [B, L, H]."""
        x, lengths, mask = self._decoder_inputs(inputs_embeds, lengths, None)
        rotary = self.gpt.rotary_pos_emb(x.shape[0])  # [L, 1, 1, D]
        h = self.gpt.decoder(hidden_states=x, attention_mask=mask, rotary_pos_emb=rotary)  # [L, B, H]
        return h.transpose(0, 1)  # [B, L, H]

    @torch.no_grad()
    def score(self, texts: Sequence[str], normalize: bool = False, add_eos: bool = False) -> Tensor:
        """log p(text | BOS) per sentence [B] fp32; ``normalize``: divided by its token count.

        ``add_eos``: score ``text + EOS``, i.e. also the probability that the sentence ends there (so that a
        truncated or empty hypothesis is not favoured); EOS then counts as one token.
        """
        ids, lengths = self.tokenize(texts, add_bos=True, add_eos=add_eos)  # [B, L]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]  # predict token t+1 at position t
        labels[torch.arange(ids.shape[1], device=self.device)[None] >= (lengths - 1)[:, None]] = IGNORE_INDEX
        token_loss, _ = self.forward_embeds(self.embed(ids), labels, lengths=lengths)
        logp = -token_loss.sum(-1)  # [B]
        return logp / (lengths - 1).clamp(min=1) if normalize else logp

    @torch.no_grad()
    def pooled_hidden(self, texts_or_ids: Union[Sequence[str], Tensor], lengths: Optional[Tensor] = None) -> Tensor:
        """Mean of last hidden states over valid tokens [B, H] fp32.

        Texts are tokenized with BOS, and the BOS position is left out of the mean (its state is an
        attention sink with a large norm that would dominate). Ids [B, L] are pooled over their first
        ``lengths`` positions as given.
        """
        skip = 0
        if isinstance(texts_or_ids, Tensor):
            ids = texts_or_ids.to(self.device)
            if lengths is None:
                lengths = torch.full((ids.shape[0],), ids.shape[1])
            lengths = lengths.to(self.device)
        else:
            ids, lengths = self.tokenize(texts_or_ids, add_bos=True)
            skip = 1
        h = self.hidden_states(self.embed(ids), lengths).float()  # [B, L, H]
        pos = torch.arange(ids.shape[1], device=self.device)[None]
        valid = ((pos >= skip) & (pos < lengths[:, None])).float()  # [B, L]
        return (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
