"""torchrun worker for the tensor-parallel tests of the soft-text objectives (gloo on CPU; fp32).

    torchrun --nproc_per_node 2 tests/softtext_tp_worker.py --mode llm_lm_loss|lang_contrastive --out DIR CKPT

``DIR/pieces.json`` holds the ASR vocabulary (pieces, special flags), written by the test. Every rank feeds its
own CTC posteriors (:func:`softtext_inputs`, seeded by the rank) through the bridge into the TP=world LLM and
writes ``DIR/rank<r>.pt`` (loss and d loss / d log-probs per variant); the tests recompute them with TP=1.
Launched with :func:`obj_tp_worker.launch` (``worker=`` this file).
"""

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported (in main)

from obj_tp_worker import TEXTS  # the tests' shared transcripts (this folder is on sys.path: it holds the script)


def softtext_inputs(rank: int, num_pieces: int, b=None):
    """Rank-specific CTC log-probs [b, T, V+1] (a peaked random greedy path), lengths [b], transcripts [b]
    (b = 2 + rank unless given)."""
    g = torch.Generator().manual_seed(300 + rank)
    b, T = b or 2 + rank, 12
    lengths = torch.tensor([12, 9, 7][:b])
    logits = torch.randn(b, T, num_pieces + 1, generator=g)
    path = torch.randint(1, num_pieces + 1, (b, T), generator=g)  # piece 0 is <unk>; num_pieces = blank
    logits.scatter_add_(2, path[..., None], torch.full((b, T, 1), 3.0))
    texts = [TEXTS[(rank * 3 + i) % len(TEXTS)] for i in range(b)]
    return logits.log_softmax(-1), lengths, texts


VARIANTS = {  # name -> (estimator, target)
    "reference": ("expected", "reference"),
    "hypothesis": ("expected", "hypothesis"),
    "st_reference": ("straight_through", "reference"),
}


def run_llm_lm_loss(host, pmap, rank: int) -> dict:
    from nemo_ctcllm.objectives.llm_lm_loss import llm_lm_loss
    from nemo_ctcllm.objectives.shared.bridge import bridge

    out = {}
    for name, (estimator, target) in VARIANTS.items():
        log_probs, lengths, texts = softtext_inputs(rank, pmap.matrix.shape[0])
        log_probs.requires_grad_(True)
        soft = bridge(log_probs, lengths, pmap, estimator)
        loss = llm_lm_loss(host, soft, texts, target, pmap.first_token, "hello")
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad": log_probs.grad}
    return out


LANG_BATCH = 3  # the same on every rank: DDP's mean of per-rank means is then the global mean


def make_lang(hidden: int):
    from nemo_ctcllm.objectives.lang_contrastive import LangContrastive
    from nemo_ctcllm.objectives.shared.bridge import SoftHypothesis

    torch.manual_seed(0)
    reader = SoftHypothesis(None, "expected", 1.0, False)
    return LangContrastive("lang_contrastive", 1.0, 0, reader, hidden, 16, cache_text=False, init_temperature=0.07)


def lang_loss(obj, host, pmap, log_probs, lengths, texts):
    """lang_contrastive's loss on given posteriors (what its forward computes from a StepContext)."""
    from nemo_ctcllm.objectives.lang_contrastive import pooled_soft_hidden
    from nemo_ctcllm.objectives.shared.bridge import bridge

    soft = bridge(log_probs, lengths, pmap, "expected")
    return obj.contrastive(pooled_soft_hidden(host, soft), obj.text_features(host, texts), texts)[0]


def run_lang_contrastive(host, pmap, rank: int) -> dict:
    log_probs, lengths, texts = softtext_inputs(rank, pmap.matrix.shape[0], b=LANG_BATCH)
    log_probs.requires_grad_(True)
    obj = make_lang(host.hidden_size)
    loss = lang_loss(obj, host, pmap, log_probs, lengths, texts)
    loss.backward()
    return {
        "loss": loss.detach(),
        "grad": log_probs.grad,
        "params": {n: p.grad.clone() for n, p in obj.named_parameters()},
    }


def main() -> None:
    import torch.distributed as dist
    from obj_tp_worker import worker_setup

    args, rank, world = worker_setup(["llm_lm_loss", "lang_contrastive"])

    from nemo_ctcllm.llm import LLMHost
    from nemo_ctcllm.objectives.shared.bridge import PieceMap

    host = LLMHost(args.checkpoint, tp_size=world, params_dtype=torch.float32)
    with open(os.path.join(args.out, "pieces.json")) as f:
        pieces, special = json.load(f)
    pmap = PieceMap.build(pieces, special, host.tokenizer, host.embed)
    run = run_llm_lm_loss if args.mode == "llm_lm_loss" else run_lang_contrastive
    result = run(host, pmap, rank)
    result["llm_grads"] = sum(p.grad is not None for p in host.llm_parameters())
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
