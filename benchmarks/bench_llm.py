#!/usr/bin/env python
"""Benchmark the megatron-hosted demo LLM (not a test).

    python -m benchmarks.bench_llm [--tp 1 3] [--batch 16] [--device cpu|cuda] [--ckpt DIR]

For each TP size a ``torchrun --nproc_per_node TP`` job (gloo on CPU, nccl on CUDA) builds
``LLMHost`` and measures on a batch of sentences:

* ``score`` throughput (tokens/s, no grad),
* ``forward_embeds`` forward alone vs forward + backward to ``inputs_embeds`` (ms and ratio),
* per-rank weight bytes and peak memory per rank (CPU: peak RSS of the process, which includes
  ~1 GB of imported libraries, reported separately as "RSS before host"; CUDA:
  ``torch.cuda.max_memory_allocated``).

CUDA runs in bf16 (the host default on GPU); TP>1 on CUDA needs TP GPUs.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
FALLBACK_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech recognition converts spoken language into text.",
    "A frozen language model can regularise an acoustic model during training.",
    "Tensor parallelism splits every weight matrix across several devices.",
]


def load_sentences(n: int) -> list[str]:
    path = REPO_ROOT / "demo" / "sentences.txt"
    lines = []
    if path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    lines = lines or FALLBACK_SENTENCES
    return [lines[i % len(lines)] for i in range(n)]


def rss_mib() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms (after one warm-up call)."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def worker(args) -> None:
    """One torchrun rank: build the host, measure, rank 0 writes the gathered stats as JSON."""
    import torch
    import torch.distributed as dist

    from nemo_ctcllm.llm import LLMHost

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rss_before = rss_mib()
    t0 = time.perf_counter()
    host = LLMHost(args.ckpt, tp_size=dist.get_world_size())
    build_s = time.perf_counter() - t0
    weight_mib = sum(p.numel() * p.element_size() for p in host.llm_parameters()) / 2**20

    texts = load_sentences(args.batch)
    ids, lengths = host.tokenize(texts)  # [B, L]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[torch.arange(ids.shape[1], device=ids.device)[None] >= (lengths - 1)[:, None]] = -100
    embeds = host.embed(ids).detach()  # [B, L, H]

    def forward():
        with torch.no_grad():
            host.forward_embeds(embeds, labels, lengths=lengths)

    def forward_backward():
        x = embeds.clone().requires_grad_(True)
        _, loss = host.forward_embeds(x, labels, lengths=lengths)
        loss.backward()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    score_ms = timed(lambda: host.score(texts), args.device, args.repeats)
    fwd_ms = timed(forward, args.device, args.repeats)
    fwd_bwd_ms = timed(forward_backward, args.device, args.repeats)
    stats = {
        "rank": dist.get_rank(),
        "build_s": build_s,
        "tokens": int(lengths.sum()),
        "score_tok_s": float(lengths.sum()) / (score_ms / 1e3),
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "weight_mib": weight_mib,
        "rss_before_mib": rss_before,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib(),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def launch(tp: int, args) -> list[dict]:
    """Run this script as a torchrun job with ``tp`` ranks; returns the per-rank stats."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / f"bench_tp{tp}.json"
    threads = max(1, (os.cpu_count() or 1) // tp)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(tp),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        __file__,
        "--worker",
        "--out",
        str(out),
        "--ckpt",
        args.ckpt,
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    subprocess.run(cmd, env=env, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    from nemo_ctcllm.llm.prepare import DEFAULT_DEMO_DIR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=str(DEFAULT_DEMO_DIR), help="HF LLaMA folder (default: demo SmolLM2)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU shims only apply without CUDA

    mem = "peak alloc MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"LLM {args.ckpt} | device {args.device} | batch {args.batch} sentences | median of {args.repeats}")
    header = (
        f"{'TP':>3} {'rank':>4} {'tokens':>6} {'score tok/s':>11} {'fwd ms':>8} {'fwd+bwd ms':>10} "
        f"{'bwd/fwd':>7} {'weights MiB':>11} {'RSS before host':>15} {mem:>14} {'build s':>7}"
    )
    print(header)
    print("-" * len(header))
    for tp in args.tp:
        for s in launch(tp, args):
            print(
                f"{tp:>3} {s['rank']:>4} {s['tokens']:>6} {s['score_tok_s']:>11.0f} {s['fwd_ms']:>8.1f} "
                f"{s['fwd_bwd_ms']:>10.1f} {s['fwd_bwd_ms'] / s['fwd_ms']:>7.2f} {s['weight_mib']:>11.1f} "
                f"{s['rss_before_mib']:>15.0f} {s['peak_mib']:>14.0f} {s['build_s']:>7.1f}"
            )


if __name__ == "__main__":
    main()
