"""torchrun worker for the tensor/data-parallel tests of ``llm_prefix_clm`` and ``clip`` (gloo on CPU; fp32).

    torchrun --nproc_per_node 2 tests/obj_tp_worker.py --mode clm|clip --out DIR CKPT

Every rank feeds a *different* batch (:func:`clm_inputs`, :func:`clip_inputs`, seeded by the rank) and
writes ``DIR/rank<r>.pt``. The tests recompute the same batches in-process with TP=1 and compare:

* ``clm``  (TP=2): loss on the TP-gathered batch, per-utterance losses, d loss / d own prompt.
* ``clip`` phase A (TP=2): text features (transcripts gathered over TP, cache shared by the group);
  phases A and B (TP=1): in-batch negatives gathered over all ranks (the encoder's data-parallel group),
  loss and gradients.
"""

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported

TEXTS = [
    "the cat sat on the mat",
    "a dog ran far away from the cat",
    "hello world",
    "speech to text is fun",
    "the dog sat",
    "hello cat",
]
CLM_INSTRUCTION = "hello world"
CLIP_D_AUDIO, CLIP_DIM = 8, 16


def clm_inputs(rank: int, hidden: int):
    """Rank-specific soft prompts: prompt [b, P, H] (b = 2 + rank), prompt_len [b], texts [b]."""
    g = torch.Generator().manual_seed(100 + rank)
    b = 2 + rank
    prompt_len = torch.tensor([4 + rank, 2, 3][:b])
    prompt = torch.randn(b, int(prompt_len.max()), hidden, generator=g)
    texts = [TEXTS[(rank * 3 + i) % len(TEXTS)] for i in range(b)]
    return prompt, prompt_len, texts


def clip_inputs(rank: int, b: int = 3):
    """Rank-specific pooled audio [b, D] and transcripts (TEXTS[2] on every rank: a cross-rank duplicate)."""
    g = torch.Generator().manual_seed(200 + rank)
    texts = [TEXTS[2]] + [TEXTS[(3 + rank * 2 + i) % len(TEXTS)] for i in range(b - 1)]
    return torch.randn(b, CLIP_D_AUDIO, generator=g), texts


def make_clip(d_text: int, cache_text: bool):
    from nemo_ctcllm.objectives.clip import ClipObjective

    torch.manual_seed(0)
    return ClipObjective("clip", 1.0, 0, CLIP_D_AUDIO, d_text, CLIP_DIM, "mean", cache_text, 0.07)


def clip_step(obj, host, pooled, texts) -> dict:
    pooled = pooled.clone().requires_grad_(True)
    feats = obj.text_features(host, texts)  # [b, H]
    loss, stats = obj.contrastive(pooled, feats, texts)
    loss.backward()
    return {
        "feats": feats,
        "loss": loss.detach(),
        "acc": stats["acc"],
        "grad": pooled.grad,
        "params": {n: p.grad.clone() for n, p in obj.named_parameters()},
    }


def run_clm(ckpt, world: int, rank: int) -> dict:
    from nemo_ctcllm.llm import LLMHost
    from nemo_ctcllm.objectives.shared.prefix import prefix_clm

    host = LLMHost(ckpt, tp_size=world, params_dtype=torch.float32)
    prompt, prompt_len, texts = clm_inputs(rank, host.hidden_size)
    prompt.requires_grad_(True)
    utt, loss = prefix_clm(host, prompt, prompt_len, texts, CLM_INSTRUCTION)
    loss.backward()
    return {
        "loss": loss.detach(),
        "utt": utt.detach(),
        "grad": prompt.grad,
        "llm_grads": sum(p.grad is not None for p in host.llm_parameters()),
    }


def run_clip(ckpt, world: int, rank: int) -> dict:
    from megatron.core import parallel_state

    from nemo_ctcllm.llm import LLMHost

    out = {}
    # phase A: TP=world -- transcripts gathered over TP; negatives from every rank
    host = LLMHost(ckpt, tp_size=world, params_dtype=torch.float32)
    pooled, texts = clip_inputs(rank)
    out["A"] = clip_step(make_clip(host.hidden_size, cache_text=False), host, pooled, texts)
    cached = make_clip(host.hidden_size, cache_text=True)
    cached.text_features(host, texts)
    calls = []
    original = host.pooled_hidden
    host.pooled_hidden = lambda *a, **k: calls.append(1) or original(*a, **k)
    out["A_cached_feats"] = cached.text_features(host, texts)
    out["A_cache"] = sorted(cached._text_cache)
    out["A_second_calls"] = len(calls)
    # phase B: TP=1 -- negatives from every rank
    del host
    parallel_state.destroy_model_parallel()
    host = LLMHost(ckpt, tp_size=1, params_dtype=torch.float32)
    assert parallel_state.get_data_parallel_world_size() == world
    out["B"] = clip_step(make_clip(host.hidden_size, cache_text=True), host, pooled, texts)
    return out


# ----------------------------------------------------------------------------- shared by the test files


def asr_batch(model, texts, lengths=(16000, 12800, 9600, 11200), seed: int = 0):
    """(signal [B, S], signal_len [B], targets [B, U], target_len [B]): noise audio, real transcripts."""
    lengths = list(lengths)[: len(texts)]
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(len(texts), max(lengths), generator=g) * 0.1  # [B, S]
    for i, n in enumerate(lengths):
        signal[i, n:] = 0.0
    ids = [model.tokenizer.text_to_ids(t) for t in texts]
    targets = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # [B, U]
    for i, row in enumerate(ids):
        targets[i, : len(row)] = torch.tensor(row)
    return signal, torch.tensor(lengths), targets, torch.tensor([len(r) for r in ids])


def torchrun(script, args, nproc: int, timeout: int):
    """Run ``script args...`` in ``nproc`` processes under torchrun on a free local port, one thread each, the
    repository root on PYTHONPATH; fails with the processes' output unless every one exits 0."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), str(Path(script).resolve()), *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def launch(mode: str, checkpoint, out_dir, nproc: int = 2, timeout: int = 300, worker=None) -> list:
    """Run this worker (or ``worker``, a script with the same command line) under torchrun; returns the
    per-rank result dicts."""
    from pathlib import Path

    torchrun(worker or __file__, ["--mode", mode, "--out", out_dir, checkpoint], nproc, timeout)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def worker_setup(modes):
    """What every torchrun worker of the tests starts with: ``--mode/--out CHECKPOINT`` parsed, one thread,
    a gloo process group. Returns (args, rank, world size)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=list(modes), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("checkpoint")
    args = ap.parse_args()

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    return args, dist.get_rank(), dist.get_world_size()


def main() -> None:
    import torch.distributed as dist

    args, rank, world = worker_setup(["clm", "clip"])
    run = run_clm if args.mode == "clm" else run_clip
    result = run(args.checkpoint, world, rank)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
