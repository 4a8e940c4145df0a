"""Hugging Face LLaMA checkpoint -> megatron-core ``GPTModel`` (config, weights, TP shards, cache).

Pipeline (all in-process, no megatron checkpoint tooling)::

    read_llama_spec(dir)          config.json            -> LlamaSpec (validated)
    load_hf_state_dict(dir)       model*.safetensors     -> HF tensors
    hf_to_megatron(hf_sd, spec)   HF names/layout        -> full (unsharded) megatron state dict
    shard_state_dict(full, ...)   full                   -> this TP rank's slice
    build_gpt_model(spec, ...)    TransformerConfig + local layer spec -> GPTModel

``load_full_state_dict`` returns the full megatron state dict from the cache written by
``write_cache`` (``scripts/prepare_llm.py``) when present, else converts on the fly. The cache is
``<ckpt>/.megatron_cache/megatron-<sha256(config.json + weights)[:16]>.safetensors`` (fp32, spec in
the metadata); it is memory-mapped, so a TP rank only reads the pages of its own shard.

Megatron layouts used (H hidden, D head dim, nq query heads, ng query groups (=KV heads),
F ffn size, V vocab, N tensor-parallel size):

* ``linear_qkv.weight``  [ng*(nq/ng + 2)*D, H]: per query group g, the rows
  ``[q heads of group g | k_g | v_g]``. Column-parallel: rank r holds groups
  ``r*ng/N .. (r+1)*ng/N - 1``, i.e. a contiguous chunk of dim 0.
* ``linear_fc1.weight``  [2F, H] = ``[gate; up]``. Column-parallel with a *gated* layout: rank r
  holds ``[gate_r; up_r]``, so gate and up are chunked separately and re-concatenated.
* ``linear_proj.weight`` [H, nq*D] and ``linear_fc2.weight`` [H, F]: row-parallel, chunk dim 1.
* ``embedding.word_embeddings.weight`` / ``output_layer.weight`` [V, H]: vocab-parallel, chunk
  dim 0. V must be divisible by N: we do *not* pad the vocabulary, because zero rows in the
  output layer would add exp(0) terms to the softmax of a frozen LLM and change its loss.
* norms (``input_layernorm`` / ``pre_mlp_layernorm`` -- the local spec keeps them as separate
  ``torch.nn.RMSNorm`` modules -- and ``decoder.final_layernorm``): replicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CACHE_FORMAT = 1
CACHE_DIRNAME = ".megatron_cache"
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
    """Raise a clear error when heads, query groups or vocab cannot be split over ``tp_size``."""
    values = {
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads (query groups)": spec.num_query_groups,
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


def transformer_config(spec: LlamaSpec, tp_size: int, params_dtype: torch.dtype, on_cpu: bool):
    """megatron ``TransformerConfig`` with LLaMA settings, dropout 0, no fusions."""
    from megatron.core.transformer.transformer_config import TransformerConfig

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


def build_gpt_model(spec: LlamaSpec, tp_size: int, params_dtype: torch.dtype, device: torch.device):
    """An (uninitialised) megatron ``GPTModel`` for ``spec``; parallel_state must be initialised."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    on_cpu = device.type == "cpu"
    config = transformer_config(spec, tp_size, params_dtype, on_cpu=on_cpu)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
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
    return model.to(device)


# ----------------------------------------------------------------------------- weights


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise LLMCheckpointError(
        f"no weights in {path}: expected {single} or {index} (safetensors only)"
    )


def load_hf_state_dict(checkpoint_dir) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint folder (fp32 on CPU), keyed by HF parameter name."""
    from safetensors.torch import load_file

    path = _require_dir(checkpoint_dir)
    sd = {}
    for f in _weight_files(path):
        if not f.is_file():
            raise LLMCheckpointError(f"missing weight shard {f}")
        sd.update({k: v.float() for k, v in load_file(str(f)).items()})
    return sd


def _take(sd: dict, key: str, shape: tuple) -> torch.Tensor:
    if key not in sd:
        raise LLMCheckpointError(f"HF checkpoint is missing tensor {key!r}")
    t = sd.pop(key)
    if tuple(t.shape) != tuple(shape):
        raise LLMCheckpointError(f"HF tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: LlamaSpec) -> torch.Tensor:
    """HF q [nq*D, H], k/v [ng*D, H] -> megatron ``linear_qkv`` [ng*(nq/ng+2)*D, H] (per-group [q.., k, v])."""
    D, ng, H = spec.head_dim, spec.num_query_groups, spec.hidden_size
    q = q.view(ng, spec.num_heads // ng * D, H)  # [ng, heads_per_group*D, H]
    k = k.view(ng, D, H)
    v = v.view(ng, D, H)
    return torch.cat([q, k, v], dim=1).reshape(-1, H)


def hf_to_megatron(hf_sd: dict[str, torch.Tensor], spec: LlamaSpec) -> dict[str, torch.Tensor]:
    """Rename + re-layout HF LLaMA tensors into a full (unsharded) megatron ``GPTModel`` state dict.

    Every expected HF tensor is shape-checked; leftover HF tensors (other than rotary buffers and a
    tied ``lm_head``) are an error.
    """
    sd = dict(hf_sd)
    H, D, F_ = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    nq, ng, V = spec.num_heads, spec.num_query_groups, spec.vocab_size
    out = {"embedding.word_embeddings.weight": _take(sd, "model.embed_tokens.weight", (V, H))}
    for i in range(spec.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = _take(sd, hf + "self_attn.q_proj.weight", (nq * D, H))
        k = _take(sd, hf + "self_attn.k_proj.weight", (ng * D, H))
        v = _take(sd, hf + "self_attn.v_proj.weight", (ng * D, H))
        gate = _take(sd, hf + "mlp.gate_proj.weight", (F_, H))
        up = _take(sd, hf + "mlp.up_proj.weight", (F_, H))
        out[mg + "input_layernorm.weight"] = _take(sd, hf + "input_layernorm.weight", (H,))
        out[mg + "self_attention.linear_qkv.weight"] = interleave_qkv(q, k, v, spec)
        out[mg + "self_attention.linear_proj.weight"] = _take(sd, hf + "self_attn.o_proj.weight", (H, nq * D))
        out[mg + "pre_mlp_layernorm.weight"] = _take(sd, hf + "post_attention_layernorm.weight", (H,))
        out[mg + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)  # [2F, H]
        out[mg + "mlp.linear_fc2.weight"] = _take(sd, hf + "mlp.down_proj.weight", (H, F_))
    out["decoder.final_layernorm.weight"] = _take(sd, "model.norm.weight", (H,))
    if spec.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # some savers still write the tied copy
    else:
        out["output_layer.weight"] = _take(sd, "lm_head.weight", (V, H))
    leftover = [k for k in sd if "rotary_emb" not in k]
    if leftover:
        raise LLMCheckpointError(f"unexpected tensors in HF checkpoint: {leftover[:8]}")
    return {k: v.contiguous() for k, v in out.items()}


def shard_state_dict(full: dict[str, Tensor], spec: LlamaSpec, tp_size: int, rank: int) -> dict[str, Tensor]:
    """Slice a full megatron state dict for tensor-parallel ``rank`` of ``tp_size`` (see module doc)."""
    check_tp_divisibility(spec, tp_size)

    def chunk(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(tp_size, dim=dim)[rank]

    out = {}
    for key, t in full.items():
        if key.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
            t = chunk(t, 0)  # column/vocab parallel; qkv groups are contiguous per rank
        elif key.endswith("linear_fc1.weight"):
            gate, up = t.chunk(2, dim=0)  # [F, H] each
            t = torch.cat([chunk(gate, 0), chunk(up, 0)], dim=0)  # [2F/N, H] = [gate_r; up_r]
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            t = chunk(t, 1)  # row parallel: split the input dim
        elif not key.endswith("layernorm.weight"):
            raise KeyError(f"no TP sharding rule for megatron tensor {key!r}")
        out[key] = t.contiguous()
    return out


def load_shards_into(model: torch.nn.Module, shard: dict[str, torch.Tensor]) -> None:
    """Strictly load a TP shard: exact key sets and exact shapes, else a descriptive error."""
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(target) - set(shard))
    unexpected = sorted(set(shard) - set(target))
    if missing or unexpected:
        raise LLMCheckpointError(f"megatron key mismatch: missing={missing[:8]} unexpected={unexpected[:8]}")
    for k, v in shard.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise LLMCheckpointError(
                f"megatron tensor {k!r}: converted shape {tuple(v.shape)} != model shape {tuple(target[k].shape)}"
            )
    with torch.no_grad():
        for k, v in shard.items():
            target[k].copy_(v)


# ----------------------------------------------------------------------------- cache


def checkpoint_hash(checkpoint_dir) -> str:
    """sha256 over config.json and the weight files (content), first 16 hex digits."""
    path = _require_dir(checkpoint_dir)
    h = hashlib.sha256()
    h.update(f"format={CACHE_FORMAT}".encode())
    for f in [path / "config.json", *_weight_files(path)]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def cache_path(checkpoint_dir, cache_dir=None) -> Path:
    """Where the converted full megatron state dict of this checkpoint is cached."""
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(checkpoint_dir) / CACHE_DIRNAME
    return cache_dir / f"megatron-{checkpoint_hash(checkpoint_dir)}.safetensors"


def write_cache(checkpoint_dir, cache_dir=None) -> Path:
    """Convert once and save the full (unsharded, fp32) megatron state dict + spec; no-op if cached.

    Stored as safetensors (spec as JSON metadata): loading is a memory map, so each TP rank only
    reads the pages of its own shard.
    """
    from safetensors.torch import save_file

    target = cache_path(checkpoint_dir, cache_dir)
    if target.is_file():
        return target
    spec = read_llama_spec(checkpoint_dir)
    full = hf_to_megatron(load_hf_state_dict(checkpoint_dir), spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    meta = {"format": str(CACHE_FORMAT), "spec": json.dumps(dataclasses.asdict(spec))}
    save_file(full, str(tmp), metadata=meta)
    tmp.replace(target)  # atomic: concurrent ranks never read a half-written file
    return target


def load_full_state_dict(checkpoint_dir, cache_dir=None) -> tuple[LlamaSpec, dict[str, torch.Tensor]]:
    """(spec, full megatron state dict): from the cache when present, else converted in-process."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    spec = read_llama_spec(checkpoint_dir)
    target = cache_path(checkpoint_dir, cache_dir)
    if target.is_file():
        with safe_open(str(target), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == str(CACHE_FORMAT) and LlamaSpec(**json.loads(meta["spec"])) == spec:
            return spec, load_file(str(target))
    return spec, hf_to_megatron(load_hf_state_dict(checkpoint_dir), spec)
