#!/usr/bin/env python
"""Host memory and time of loading the LLM per TP rank, and of one forward + backward to the inputs.

1. A random LLaMA checkpoint of a real model's shape, bf16 safetensors, written tensor by tensor (never more
   than one file's tensors, ~512 MiB, in memory); the tokenizer is copied from any small HF folder, since only
   the weights matter for memory::

       python -m benchmarks.bench_llm_load write --out CKPT [--shape llama-3.2-1b] [--tokenizer-from DIR]

2. Load it with TP=N (gloo on CPU) and report per rank, as one JSON line each::

       torchrun --nproc-per-node N -m benchmarks.bench_llm_load load --ckpt CKPT [--dtype bf16|fp32]
       torchrun --nproc-per-node 1 -m benchmarks.bench_llm_load load --ckpt CKPT --fwd-bwd [--recompute]

   ``base_gb``: resident set after imports and process-group setup, before the host is built;
   ``peak_gb``: the process's peak resident set (``VmHWM``) at the end of the load, file-backed pages of the
   memory-mapped safetensors included; ``own_gb``: this rank's parameter bytes;
   ``ratio``: (peak - base) / own. ``--fwd-bwd``: the peak is reset after the load (``/proc/self/clear_refs``)
   and ``fwd_bwd_delta_gb`` is the peak during ``forward_embeds`` + ``backward`` (a soft prompt of ``--prompt``
   vectors that require grad, then ``--seq`` text tokens as labels, batch ``--batch``) minus the resident set
   just before it.
"""

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

GB = 1e9
# config.json fields of the real models (Hugging Face model cards of meta-llama/Llama-3.2-1B and Llama-3.1-8B)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        head_dim=64,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
        head_dim=128,
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_shapes(cfg: dict) -> dict:
    """HF LLaMA tensor name -> shape for a config dict (the tensors ``LlamaForCausalLM`` saves)."""
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D, nq, ng = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (nq * D, H),
                p + "self_attn.k_proj.weight": (ng * D, H),
                p + "self_attn.v_proj.weight": (ng * D, H),
                p + "self_attn.o_proj.weight": (H, nq * D),
                p + "post_attention_layernorm.weight": (H,),
                p + "mlp.gate_proj.weight": (F, H),
                p + "mlp.up_proj.weight": (F, H),
                p + "mlp.down_proj.weight": (H, F),
            }
        )
    shapes["model.norm.weight"] = (H,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def write_random(out: Path, shape: str, tokenizer_from: Path, file_bytes: int = 512 << 20) -> None:
    """A random bf16 checkpoint: N(0, 0.02) matrices, ones for norms, split into files of ~``file_bytes``."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = SHAPES[shape]
    LlamaConfig(
        **cfg, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"
    ).to_json_file(out / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, out / name)
    gen = torch.Generator().manual_seed(0)
    weight_map, part, part_bytes, files = {}, {}, 0, []

    def flush():
        nonlocal part, part_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        files.append(name)
        part, part_bytes = {}, 0

    for name, shp in hf_shapes(cfg).items():
        if len(shp) == 1:
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = torch.randn(shp, generator=gen, dtype=torch.bfloat16).mul_(0.02)
        part[name] = t
        part_bytes += t.numel() * 2
        if part_bytes >= file_bytes:
            flush()
    if part:
        flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    n = sum(torch.Size(s).numel() for s in hf_shapes(cfg).values())
    print(json.dumps({"out": str(out), "params": n, "files": len(files), "bytes": total}))


def rss_gb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in GB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GB
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0, proc(5))


def fwd_bwd(host, batch: int, prompt: int, seq: int) -> dict:
    """Forward + backward to a soft prompt [B, P, H] followed by ``seq`` embedded text tokens."""
    g = torch.Generator().manual_seed(0)
    soft = (torch.randn(batch, prompt, host.hidden_size, generator=g) * 0.02).to(host.dtype).requires_grad_(True)
    ids = torch.randint(3, min(host.vocab_size, 30000), (batch, seq), generator=g)  # [B, S]
    x = torch.cat([soft, host.embed(ids)], dim=1)  # [B, P+S, H]
    labels = torch.full((batch, prompt + seq), -100, dtype=torch.long)
    labels[:, prompt - 1 : -1] = ids  # predict text token t from position t-1
    before = rss_gb("VmRSS")
    reset_peak()
    t0 = time.time()
    _, loss = host.forward_embeds(x, labels)
    loss.backward()
    return {
        "fwd_bwd_s": round(time.time() - t0, 1),
        "fwd_bwd_delta_gb": round(rss_gb("VmHWM") - before, 3),
        "tokens": batch * (prompt + seq),
        "grad_finite": bool(torch.isfinite(soft.grad).all()),
    }


def load(args) -> None:
    import torch.distributed as dist

    from nemo_ctcllm.llm import LLMHost

    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = rss_gb("VmRSS")
    t0 = time.time()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    host = LLMHost(args.ckpt, tp_size=world, params_dtype=dtype, activation_recompute=args.recompute)
    load_s = time.time() - t0
    own = sum(p.numel() * p.element_size() for p in host.llm_parameters()) / GB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux; equals VmHWM here
    row = {
        "rank": rank,
        "tp": world,
        "dtype": args.dtype,
        "load_s": round(load_s, 1),
        "base_gb": round(base, 3),
        "peak_gb": round(peak, 3),
        "own_gb": round(own, 3),
        "ratio": round((peak - base) / own, 3),
    }
    if args.fwd_bwd:
        row.update(recompute=args.recompute, **fwd_bwd(host, args.batch, args.prompt, args.seq))
    dist.barrier()
    print(json.dumps(row), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    w.add_argument("--tokenizer-from", type=Path, default=Path("artifacts/llm/smollm2-135m"))
    ld = sub.add_parser("load")
    ld.add_argument("--ckpt", required=True)
    ld.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ld.add_argument("--recompute", action="store_true", help="model.llm.activation_recompute")
    ld.add_argument("--fwd-bwd", action="store_true")
    ld.add_argument("--batch", type=int, default=2)
    ld.add_argument("--prompt", type=int, default=16)
    ld.add_argument("--seq", type=int, default=112)
    args = ap.parse_args()
    if args.cmd == "write":
        write_random(args.out, args.shape, args.tokenizer_from)
    else:
        load(args)


if __name__ == "__main__":
    main()
