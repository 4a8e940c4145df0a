"""Hugging Face LLaMA checkpoint -> megatron-core ``GPTModel`` (config, model, this TP rank's weights).

Pipeline (all in-process, no megatron checkpoint tooling, no converted copy on disk)::

    read_llama_spec(dir)                 config.json        -> LlamaSpec (validated)
    build_gpt_model(spec, ...)           TransformerConfig + explicit torch-norm spec -> empty GPTModel
    load_tp_shard(model, dir, spec, ..)  model*.safetensors -> this rank's slices, copied into the model

Each rank reads only its own slices (``safe_open(...).get_slice``), in the checkpoint's dtype, one tensor at a
time, and copies them straight into the parameters (dtype converted there): no full state dict, no
concatenated copy, no cache. The re-layout HF -> megatron is a strided copy into views of the parameter, so a
converted cache would save nothing but a memory copy per tensor.

Megatron layouts used (H hidden, D head dim, nq query heads, ng query groups (=KV heads),
F ffn size, V vocab, N tensor-parallel size):

* ``linear_qkv.weight``  [ng*(nq/ng + 2)*D, H]: per query group g, the rows
  ``[q heads of group g | k_g | v_g]``. Column-parallel: rank r holds groups
  ``r*ng/N .. (r+1)*ng/N - 1``, i.e. rows ``r*nq/N*D ..`` of HF ``q_proj`` and ``r*ng/N*D ..`` of
  ``k_proj`` / ``v_proj`` (the query heads of a group are consecutive in HF).
* ``linear_fc1.weight``  [2F, H] = ``[gate; up]``. Column-parallel with a *gated* layout: rank r
  holds ``[gate_r; up_r]`` (rows ``r*F/N ..`` of HF ``gate_proj`` and of ``up_proj``).
* ``linear_proj.weight`` [H, nq*D] and ``linear_fc2.weight`` [H, F]: row-parallel, columns ``r/N ..``.
* ``embedding.word_embeddings.weight`` / ``output_layer.weight`` [V, H]: vocab-parallel, rows
  ``r*V/N ..``. V must be divisible by N: we do *not* pad the vocabulary, because zero rows in the
  output layer would add exp(0) terms to the softmax of a frozen LLM and change its loss.
* norms (``input_layernorm`` / ``pre_mlp_layernorm`` per layer and ``decoder.final_layernorm``): replicated,
  and always ``torch.nn.RMSNorm`` (see :func:`build_gpt_model`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}


class LLMCheckpointError(ValueError):
    """A checkpoint folder that cannot be hosted (missing files, wrong architecture, bad TP size)."""


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The subset of a HF LLaMA ``config.json`` that determines the megatron model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_query_groups: int  # = num_key_value_heads (GQA); == num_heads for MHA
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    # llama3-style {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} or None
    rope_scaling: Optional[dict]
    tie_word_embeddings: bool
    max_position_embeddings: int


# ----------------------------------------------------------------------------- config


def _require_dir(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise LLMCheckpointError(f"LLM checkpoint folder not found: {path}")
    if not (path / "config.json").is_file():
        raise LLMCheckpointError(f"LLM checkpoint folder has no config.json: {path / 'config.json'}")
    return path


def _rope_from_config(cfg: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, llama3 scaling dict or None) from either transformers<5 or >=5 config layouts."""
    # transformers >= 5 writes "rope_parameters" {rope_theta, rope_type, ...}; older versions write
    # a top-level "rope_theta" and an optional "rope_scaling" {rope_type|type, factor, ...}.
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise LLMCheckpointError(
            f"unsupported rope scaling type {rope_type!r} (supported: none/'default' and 'llama3')"
        )
    scaling = {
        "factor": float(params["factor"]),
        "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": int(params.get("original_max_position_embeddings", 8192)),
    }
    return theta, scaling


def read_llama_spec(checkpoint_dir) -> LlamaSpec:
    """Parse and validate ``config.json`` of a HF LLaMA checkpoint folder."""
    path = _require_dir(checkpoint_dir)
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type")
    archs = set(cfg.get("architectures") or [])
    if model_type != "llama" or (archs and not archs & LLAMA_ARCHITECTURES):
        raise LLMCheckpointError(
            f"{path / 'config.json'}: only LLaMA-family checkpoints are supported "
            f"(model_type='llama', architectures={sorted(LLAMA_ARCHITECTURES)}); "
            f"got model_type={model_type!r}, architectures={sorted(archs)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise LLMCheckpointError(f"{path}: hidden_act={cfg['hidden_act']!r}, expected 'silu'")
    if cfg.get("attention_bias", False) or cfg.get("mlp_bias", False):
        raise LLMCheckpointError(f"{path}: attention_bias/mlp_bias are not supported")
    num_heads = int(cfg["num_attention_heads"])
    theta, scaling = _rope_from_config(cfg)
    return LlamaSpec(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
    )


def check_tp_divisibility(spec: LlamaSpec, tp_size: int) -> None:
    """Raise a clear error when heads, query groups, FFN size or vocab cannot be split over ``tp_size``.

    Cheap (config.json only): callers run it before any process group is created or waited on."""
    values = {
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads (query groups)": spec.num_query_groups,
        "intermediate_size (ffn_hidden_size)": spec.ffn_hidden_size,
        "vocab_size": spec.vocab_size,
    }
    for name, value in values.items():
        if value % tp_size != 0:
            allowed = [t for t in range(1, spec.num_heads + 1) if all(v % t == 0 for v in values.values())]
            raise LLMCheckpointError(
                f"model.llm.tensor_model_parallel_size={tp_size}: the LLM's {name}={value} is not divisible by it; "
                f"allowed sizes for this LLM: {allowed}"
            )


# ----------------------------------------------------------------------------- model


def transformer_config(
    spec: LlamaSpec, tp_size: int, params_dtype: torch.dtype, on_cpu: bool, activation_recompute: bool = False
):
    """megatron ``TransformerConfig`` with LLaMA settings, dropout 0, no fusions.

    ``activation_recompute``: megatron's full recompute, one layer per checkpoint (only each layer's input is
    kept; the layer is re-run in backward). It takes effect only while the block is in training mode, which
    :class:`~nemo_ctcllm.llm.host.LLMHost` sets for its gradient-carrying calls."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,  # every weight is loaded from the checkpoint
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **(recompute if activation_recompute else {}),
    )


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """LLaMA-3 frequency scaling of RoPE ``inv_freq`` [D/2] (same formula as HF ``_compute_llama3_parameters``)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def torch_norm_block_spec(num_layers: int):
    """megatron block spec: the local (megatron-core only) LLaMA layer, with every norm -- both per-layer ones
    and the block's final one -- the plain ``torch.nn.RMSNorm`` (via megatron's ``WrappedTorchNorm``).

    Given only a layer spec, megatron picks the block's final norm itself: Transformer Engine's ``TENorm``
    when TE is installed, apex ``FusedLayerNorm`` when only apex is (which rejects RMSNorm), torch otherwise
    (``megatron/core/transformer/transformer_block.py``, ``LayerNormImpl``). Naming it here makes the LLM the
    same module on every image, with or without TE or apex."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            layer.submodules, input_layernorm=WrappedTorchNorm, pre_mlp_layernorm=WrappedTorchNorm
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=WrappedTorchNorm)


def build_gpt_model(
    spec: LlamaSpec, tp_size: int, params_dtype: torch.dtype, device: torch.device, activation_recompute: bool = False
):
    """An (uninitialised) megatron ``GPTModel`` for ``spec``; parallel_state must be initialised."""
    from megatron.core.models.gpt import GPTModel

    on_cpu = device.type == "cpu"
    config = transformer_config(spec, tp_size, params_dtype, on_cpu=on_cpu, activation_recompute=activation_recompute)
    model = GPTModel(
        config=config,
        transformer_layer_spec=torch_norm_block_spec(spec.num_layers),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,  # logits stay vocab-sharded; loss via vocab_parallel_cross_entropy
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
    )
    rope = model.rotary_pos_emb
    if spec.rope_scaling is not None:
        # megatron's own rope_scaling hard-codes low/high freq factors and the original context
        # length; apply the checkpoint's exact llama3 parameters instead (inv_freq is a plain
        # attribute, not a buffer, so nothing extra lands in the state dict).
        rope.inv_freq = llama3_inv_freq(rope.inv_freq.float().cpu(), spec.rope_scaling)
    rope.inv_freq = rope.inv_freq.to(device)
    # every parameter in params_dtype: megatron's torch-norm wrapper builds torch.nn.RMSNorm without a dtype, so a
    # bf16 model would otherwise keep fp32 norms (mixed-dtype norms: no fused kernel, and fp32 activations after
    # them)
    return model.to(device=device, dtype=params_dtype)


# ----------------------------------------------------------------------------- weights


def weight_files(checkpoint_dir) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (from ``model.safetensors.index.json`` or the single
    ``model.safetensors``); every file must exist."""
    from safetensors import safe_open

    path = _require_dir(checkpoint_dir)
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        files = {name: path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    elif single.is_file():
        with safe_open(str(single), framework="pt") as f:
            files = dict.fromkeys(f.keys(), single)
    else:
        raise LLMCheckpointError(f"no weights in {path}: expected {single} or {index} (safetensors only)")
    for f in sorted(set(files.values())):
        if not f.is_file():
            raise LLMCheckpointError(f"missing weight shard {f}")
    return files


@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor's part of a megatron tensor: this rank reads its slice along ``split_dim`` (None: the
    whole tensor, replicated) and copies it into ``place(megatron_tensor)``, a view of the right shape."""

    hf_name: str
    hf_shape: tuple[int, ...]
    split_dim: Optional[int]
    place: Callable[[Tensor], Tensor] = lambda t: t


def megatron_layout(spec: LlamaSpec, tp_size: int) -> dict[str, list[Piece]]:
    """Megatron ``GPTModel`` state-dict key -> the HF pieces one TP rank copies into it (see module doc)."""
    H, D, F_ = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    nq, ng, V = spec.num_heads, spec.num_query_groups, spec.vocab_size
    g, h, f = ng // tp_size, nq // ng, F_ // tp_size  # query groups, heads per group, FFN rows of one rank

    def qkv(t: Tensor) -> Tensor:
        return t.view(g, h + 2, D, H)  # [groups, (q heads | k | v), D, H]

    # the two [V/N, H] tensors first: their slices are the largest reads and happen while little is resident
    layout = {"embedding.word_embeddings.weight": [Piece("model.embed_tokens.weight", (V, H), 0)]}
    if not spec.tie_word_embeddings:
        layout["output_layer.weight"] = [Piece("lm_head.weight", (V, H), 0)]
    for i in range(spec.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        layout.update(
            {
                mg + "input_layernorm.weight": [Piece(hf + "input_layernorm.weight", (H,), None)],
                mg + "self_attention.linear_qkv.weight": [
                    Piece(hf + "self_attn.q_proj.weight", (nq * D, H), 0, lambda t: qkv(t)[:, :h]),  # [g, h, D, H]
                    Piece(hf + "self_attn.k_proj.weight", (ng * D, H), 0, lambda t: qkv(t)[:, h]),  # [g, D, H]
                    Piece(hf + "self_attn.v_proj.weight", (ng * D, H), 0, lambda t: qkv(t)[:, h + 1]),  # [g, D, H]
                ],
                mg + "self_attention.linear_proj.weight": [Piece(hf + "self_attn.o_proj.weight", (H, nq * D), 1)],
                mg + "pre_mlp_layernorm.weight": [Piece(hf + "post_attention_layernorm.weight", (H,), None)],
                mg + "mlp.linear_fc1.weight": [
                    Piece(hf + "mlp.gate_proj.weight", (F_, H), 0, lambda t: t[:f]),  # [F/N, H]
                    Piece(hf + "mlp.up_proj.weight", (F_, H), 0, lambda t: t[f:]),  # [F/N, H]
                ],
                mg + "mlp.linear_fc2.weight": [Piece(hf + "mlp.down_proj.weight", (H, F_), 1)],
            }
        )
    layout["decoder.final_layernorm.weight"] = [Piece("model.norm.weight", (H,), None)]
    return layout


def read_slice(file: Path, piece: Piece, tp_size: int, rank: int) -> Tensor:
    """This rank's slice of one HF tensor, in the checkpoint's dtype; the full shape is checked first.

    The file is opened for this one tensor: safetensors memory-maps it, and the pages read stay in this
    process's resident set until the map is closed."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        sl = f.get_slice(piece.hf_name)
        shape = tuple(sl.get_shape())
        if shape != piece.hf_shape:
            raise LLMCheckpointError(
                f"HF tensor {piece.hf_name!r} in {file} has shape {shape}, expected {piece.hf_shape}"
            )
        if piece.split_dim is None:
            return sl[:]
        n = shape[piece.split_dim] // tp_size
        return sl[(slice(None),) * piece.split_dim + (slice(rank * n, (rank + 1) * n),)]


def load_tp_shard(model: torch.nn.Module, checkpoint_dir, spec: LlamaSpec, tp_size: int, rank: int) -> None:
    """Fill ``model`` (built by :func:`build_gpt_model` for ``spec`` / ``tp_size``) with TP rank ``rank``'s
    slices of the HF checkpoint: exact key sets and exact shapes on both sides, else a descriptive error.

    Memory: the model's own parameters plus one slice in flight (and, while its file is open, the mapped pages
    it was read from)."""
    files = weight_files(checkpoint_dir)
    layout = megatron_layout(spec, tp_size)
    expected = {p.hf_name for pieces in layout.values() for p in pieces}
    missing = sorted(expected - set(files))
    if missing:
        raise LLMCheckpointError(f"HF checkpoint {checkpoint_dir} is missing tensor(s) {missing[:8]}")
    ignorable = {"lm_head.weight"} if spec.tie_word_embeddings else set()  # some savers write the tied copy
    leftover = sorted(k for k in set(files) - expected - ignorable if "rotary_emb" not in k)
    if leftover:
        raise LLMCheckpointError(f"unexpected tensors in HF checkpoint {checkpoint_dir}: {leftover[:8]}")

    target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if set(target) != set(layout):
        raise LLMCheckpointError(
            f"megatron key mismatch: missing={sorted(set(target) - set(layout))[:8]} "
            f"unexpected={sorted(set(layout) - set(target))[:8]}"
        )
    with torch.no_grad():
        for key, pieces in layout.items():
            param, filled = target[key], 0
            for piece in pieces:
                src = read_slice(files[piece.hf_name], piece, tp_size, rank)  # checkpoint dtype
                dest = piece.place(param)
                if src.numel() != dest.numel():
                    raise LLMCheckpointError(
                        f"megatron tensor {key!r} {tuple(param.shape)}: {piece.hf_name!r} "
                        f"slice {tuple(src.shape)} does not fit {tuple(dest.shape)}"
                    )
                dest.copy_(src.view(dest.shape))  # converts to the parameters' dtype / device
                filled += dest.numel()
                del src
            if filled != param.numel():
                raise LLMCheckpointError(
                    f"megatron tensor {key!r} {tuple(param.shape)}: the checkpoint fills "
                    f"{filled} of its {param.numel()} elements"
                )
