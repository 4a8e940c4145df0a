"""torchrun worker for the tensor-parallel tests of ``LLMHost`` (gloo on CPU, nccl on GPUs; fp32).

    torchrun --nproc_per_node N tests/llm_tp_worker.py --out res.pt CKPT [CKPT ...]

Every rank builds the host with TP=N on each checkpoint, runs the same deterministic inputs
(:func:`run_probe`) and rank 0 saves ``{ckpt: results}`` with ``torch.save``. The test runs
:func:`run_probe` in-process with TP=1 and compares.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def probe_inputs(vocab_size: int, batch: int = 3, seq_len: int = 9, seed: int = 0):
    """Identical on every rank: ids [B, L] (ids >= 3), lengths [B], shifted labels [B, L]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=g)
    lengths = torch.tensor([seq_len, seq_len - 3, 4][:batch])
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[torch.arange(seq_len)[None] >= (lengths - 1)[:, None]] = -100
    return ids, lengths, labels


def run_probe(host) -> dict:
    """Per-token loss, mean loss, d(loss)/d(inputs_embeds), pooled hidden states and scores."""
    ids, lengths, labels = probe_inputs(host.vocab_size)
    x = host.embed(ids).detach().float().requires_grad_(True)  # [B, L, H]
    token_loss, loss = host.forward_embeds(x, labels, lengths=lengths)
    loss.backward()
    return {
        "token_loss": token_loss.detach().cpu(),
        "loss": loss.detach().cpu(),
        "grad": x.grad.detach().cpu(),
        "pooled": host.pooled_hidden(ids, lengths).cpu(),
        "score": host.score(["the cat sat on the mat", "hello world"], normalize=True).cpu(),
        "llm_grads": sum(p.grad is not None for p in host.llm_parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("checkpoints", nargs="+")
    args = ap.parse_args()

    import torch.distributed as dist

    from nemo_ctcllm.llm import LLMHost

    torch.set_num_threads(1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    results = {}
    for ckpt in args.checkpoints:
        host = LLMHost(ckpt, tp_size=dist.get_world_size(), params_dtype=torch.float32)
        results[ckpt] = run_probe(host)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
