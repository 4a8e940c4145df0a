"""torchrun worker for the tensor-parallel tests of ``LLMHost`` (gloo on CPU, nccl on GPUs; fp32).

    torchrun --nproc_per_node N tests/llm_tp_worker.py --out res.pt [--also-recompute] CKPT [CKPT ...]

Every rank builds the host with TP=N on each checkpoint, checks its layout (:func:`check_host_layout`: TP size,
rank, every shard's shape, torch norms), runs the same deterministic inputs (:func:`run_probe`) and rank 0 saves
``{ckpt: results}`` with ``torch.save``; ``--also-recompute`` adds ``{ckpt + "#recompute": results}`` from a host
with activation recompute. The test runs :func:`run_probe` in-process with TP=1 and compares.
"""

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported


def probe_inputs(vocab_size: int, batch: int = 3, seq_len: int = 9, seed: int = 0):
    """Identical on every rank: ids [B, L] (ids >= 3), lengths [B], shifted labels [B, L]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=g)
    lengths = torch.tensor([seq_len, seq_len - 3, 4][:batch])
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[torch.arange(seq_len)[None] >= (lengths - 1)[:, None]] = -100
    return ids, lengths, labels


def expected_shard_shapes(spec, tp: int) -> dict:
    """Megatron state-dict key -> the shape one TP rank must hold, written out from the LLaMA dimensions."""
    H, D, F, L = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size, spec.num_layers
    nq, ng, V = spec.num_heads, spec.num_query_groups, spec.vocab_size
    shapes = {"embedding.word_embeddings.weight": (V // tp, H), "decoder.final_layernorm.weight": (H,)}
    for i in range(L):
        p = f"decoder.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (H,),
                p + "self_attention.linear_qkv.weight": ((nq + 2 * ng) * D // tp, H),
                p + "self_attention.linear_proj.weight": (H, nq * D // tp),
                p + "pre_mlp_layernorm.weight": (H,),
                p + "mlp.linear_fc1.weight": (2 * F // tp, H),
                p + "mlp.linear_fc2.weight": (H, F // tp),
            }
        )
    if not spec.tie_word_embeddings:
        shapes["output_layer.weight"] = (V // tp, H)
    return shapes


def check_host_layout(host, tp: int) -> None:
    """The host really runs at TP=``tp``: megatron's TP size and rank, every shard's shape, and the norms."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert host.tp_size == tp == parallel_state.get_tensor_model_parallel_world_size(), (host.tp_size, tp)
    assert parallel_state.get_tensor_model_parallel_rank() == dist.get_rank() % tp
    held = {k: tuple(v.shape) for k, v in host.gpt.state_dict().items() if not k.endswith("_extra_state")}
    assert held == expected_shard_shapes(host.spec, tp), sorted(
        set(held.items()) ^ set(expected_shard_shapes(host.spec, tp).items())
    )[:8]
    norms = [host.gpt.decoder.final_layernorm]
    for layer in host.gpt.decoder.layers:
        norms += [layer.input_layernorm, layer.pre_mlp_layernorm]
    assert all(type(n) is torch.nn.RMSNorm for n in norms), {type(n).__name__ for n in norms}


def run_probe(host) -> dict:
    """Per-token loss, mean loss, d(loss)/d(inputs_embeds), pooled hidden states and scores."""
    ids, lengths, labels = probe_inputs(host.vocab_size)
    x = host.embed(ids).detach().float().requires_grad_(True)  # [B, L, H]
    token_loss, loss = host.forward_embeds(x, labels, lengths=lengths)
    loss.backward()
    return {
        "tp_size": host.tp_size,
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
    ap.add_argument("--also-recompute", action="store_true")
    ap.add_argument("checkpoints", nargs="+")
    args = ap.parse_args()

    import torch.distributed as dist

    from nemo_ctcllm.llm import LLMHost

    torch.set_num_threads(1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    results = {}
    for ckpt in args.checkpoints:
        for recompute in (False, True) if args.also_recompute else (False,):
            host = LLMHost(ckpt, tp_size=world, params_dtype=torch.float32, activation_recompute=recompute)
            check_host_layout(host, world)
            results[ckpt + ("#recompute" if recompute else "")] = run_probe(host)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
