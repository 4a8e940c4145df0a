"""torchrun worker for the TP test of the hypothesis-side objectives (gloo on CPU; fp32).

    torchrun --nproc_per_node 2 tests/hyp_tp_worker.py --mode scores --out DIR CKPT

Every rank scores its *own* hypothesis texts (:func:`hyp_texts`) with
:func:`nemo_ctcllm.objectives.shared.hypotheses.llm_log_likelihood` on a TP=2 LLM (texts gathered over the TP group,
every rank runs the LLM on all of them) and writes its rows to ``DIR/rank<r>.pt``; the test compares them
with TP=1 in one process.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "hello", "world", "speech", "is", "fun"]


def hyp_texts(rank: int):
    """Rank-specific N-best-like texts (3 + rank of them, one empty: an empty hypothesis is scored too)."""
    g = torch.Generator().manual_seed(300 + rank)
    texts = [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g).tolist())
        for n in torch.randint(1, 7, (2 + rank,), generator=g)
    ]
    return texts + [""]


def main() -> None:
    import torch.distributed as dist
    from obj_tp_worker import worker_setup

    args, rank, world = worker_setup(["scores"])

    from nemo_ctcllm.llm import LLMHost
    from nemo_ctcllm.objectives.shared.hypotheses import llm_log_likelihood

    host = LLMHost(args.checkpoint, tp_size=world, params_dtype=torch.float32)
    texts = hyp_texts(rank)
    result = {
        "texts": texts,
        "summed": llm_log_likelihood(host, texts, normalize=False),
        "normalized": llm_log_likelihood(host, texts, normalize=True),
    }
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
