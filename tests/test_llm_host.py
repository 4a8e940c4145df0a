"""Tests of the megatron-hosted LLM (``nemo_ctcllm.llm``) on CPU.

* tiny random LLaMAs (GQA/MHA, tied/untied, llama3 RoPE scaling) and the demo SmolLM2 reproduce
  transformers' ``LlamaForCausalLM`` logits and loss, with torch RMSNorm as every norm;
* TP=2 (torchrun, gloo) matches TP=1 on every tiny variant, with and without activation recompute: per-token
  loss and d loss / d inputs_embeds; the workers assert their TP size and every shard's shape;
  optional TP=3 on SmolLM2 (set ``LLM_TEST_TP3=1``);
* loading: sharded bf16 checkpoints read slice by slice in their own dtype; activation recompute;
* frozen LLM, clear errors, state-dict hygiene, CPU shims.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LLM_CORPUS as CORPUS
from conftest import make_tiny_llama
from llm_tp_worker import check_host_layout, probe_inputs, run_probe
from obj_tp_worker import torchrun

from nemo_ctcllm.llm import LLMCheckpointError, LLMHost, apply_cpu_patches, convert

TESTS_DIR = Path(__file__).resolve().parent

TINY_VARIANTS = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_tied_llama3rope": dict(  # 8 heads in 4 groups: at TP=2 a rank holds 2 groups of 2 query heads
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llama")
    return {name: make_tiny_llama(root / name, seed=i, **kw) for i, (name, kw) in enumerate(TINY_VARIANTS.items())}


_HOSTS = {}


@pytest.fixture(scope="module", autouse=True)
def _release_hosts(llm_process_group):
    """Drop the cached hosts before conftest's llm_process_group tears the process group down."""
    yield
    _HOSTS.clear()


def get_host(path) -> LLMHost:
    """One fp32 TP=1 host per checkpoint for the whole module (building is the slow part)."""
    if str(path) not in _HOSTS:
        _HOSTS[str(path)] = LLMHost(path, tp_size=1, params_dtype=torch.float32)  # fp32 on GPU too
    return _HOSTS[str(path)]


def hf_reference(path, ids, lengths):
    """transformers logits [B, L, V] and mean next-token loss for right-padded ids [B, L] (fp32 weights)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model = model.eval().to(ids.device)
    valid = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]  # [B, L]
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=valid.long(), labels=ids.masked_fill(~valid, -100), output_hidden_states=True
        )
    return out.logits, out.loss, out.hidden_states[-1], valid


def compare_with_transformers(path, texts, host=None):
    host = host or get_host(path)
    check_host_layout(host, 1)  # torch RMSNorm everywhere, full-size shards
    ids, lengths = host.tokenize(texts)  # [B, L], [B]
    ref_logits, ref_loss, ref_hidden, valid = hf_reference(path, ids, lengths)
    labels, _ = shifted_labels(ids, lengths)
    with torch.no_grad():
        x = host.embed(ids)  # [B, L, H]
        logits = host.vocab_parallel_logits(x, lengths)  # [B, L, V]
        token_loss, loss = host.forward_embeds(x, labels, lengths=lengths)
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits)[valid].abs().max().item() <= 1e-4
    assert abs(loss.item() - ref_loss.item()) <= 1e-4
    ref_token_loss = torch.nn.functional.cross_entropy(  # fp64: fp32 CPU CE over 49k classes is off by ~2e-4
        ref_logits.double().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )  # [B, L]
    assert (token_loss - ref_token_loss).abs().max().item() <= 1e-4
    pooled_valid = valid.clone()
    pooled_valid[:, 0] = False  # pooled_hidden(texts) leaves BOS out
    ref_pooled = (ref_hidden * pooled_valid[..., None]).sum(1) / pooled_valid.sum(1, keepdim=True)
    assert (host.pooled_hidden(texts) - ref_pooled).abs().max().item() <= 1e-4


def shifted_labels(ids, lengths):
    """Megatron-convention labels [B, L]: token t+1 at position t, -100 past each sequence."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[torch.arange(ids.shape[1], device=ids.device)[None] >= (lengths - 1)[:, None]] = -100
    return labels, (labels != -100)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_llama_matches_transformers(tiny_ckpts, variant):
    compare_with_transformers(tiny_ckpts[variant], CORPUS[:3])


def test_smollm2_matches_transformers(smollm2_dir):
    host = get_host(smollm2_dir)
    assert (host.hidden_size, host.vocab_size, host.tp_size) == (576, 49152, 1)
    assert (host.spec.num_layers, host.spec.num_heads, host.spec.num_query_groups) == (30, 9, 3)
    assert host.spec.rope_theta == 100000.0 and host.spec.tie_word_embeddings
    compare_with_transformers(
        smollm2_dir, ["The quick brown fox jumps over the lazy dog.", "Hello world", "Speech recognition is fun."]
    )


def test_score_is_batch_invariant_and_normalized(tiny_ckpts):
    host = get_host(tiny_ckpts["gqa_untied"])
    texts = CORPUS[:3]
    batched = host.score(texts)
    single = torch.cat([host.score([t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    _, lengths = host.tokenize(texts)
    torch.testing.assert_close(host.score(texts, normalize=True), batched / (lengths - 1), atol=1e-6, rtol=1e-6)
    assert (batched < 0).all()


def test_tokenize_pads_right_and_roundtrips(tiny_ckpts):
    host = get_host(tiny_ckpts["gqa_untied"])
    ids, lengths = host.tokenize(["hello world", "the cat sat on the mat"], add_eos=True)
    assert ids.dtype == torch.long and ids.shape == (2, 8) and lengths.tolist() == [4, 8]
    assert ids[:, 0].tolist() == [1, 1] and ids[0, 3].item() == 2 and ids[0, 4:].eq(host.pad_id).all()
    assert host.detokenize(ids, lengths) == ["hello world", "the cat sat on the mat"]


# ----------------------------------------------------------------------------- frozen / hygiene


def test_grad_reaches_embeds_but_not_llm(tiny_ckpts):
    host = get_host(tiny_ckpts["mha_tied"])
    assert not host.gpt.training
    assert all(not p.requires_grad for p in host.llm_parameters())
    result = run_probe(host)
    assert result["llm_grads"] == 0
    grad = result["grad"]  # [B, L, H]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    ids, lengths, _ = probe_inputs(host.vocab_size)
    pad = torch.arange(ids.shape[1])[None] >= lengths[:, None]
    assert grad[pad].abs().max() == 0  # padded positions never influence the loss


def test_cpu_autocast_leaves_the_llm_in_its_own_precision(tiny_ckpts):
    """trainer.precision=bf16-mixed on CPU: the fp32 LLM runs outside autocast (megatron's frozen-weight linear
    cannot backpropagate a bf16 gradient into fp32 weights), so loss, input gradient and pooled states are the
    fp32 ones, not bf16 approximations."""
    host = get_host(tiny_ckpts["gqa_untied"])
    ids, lengths, labels = probe_inputs(host.vocab_size)

    def probe(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x = host.embed(ids).detach().float().requires_grad_(True)  # [B, L, H]
            token_loss, loss = host.forward_embeds(x, labels, lengths=lengths)
            pooled = host.pooled_hidden(ids, lengths)  # [B, H]
        loss.backward()  # outside autocast, where Lightning's precision plugin calls it
        return {"token_loss": token_loss.detach(), "grad": x.grad, "pooled": pooled}

    ref, amp = probe(False), probe(True)
    for key in ref:
        assert amp[key].dtype == torch.float32, key
        torch.testing.assert_close(amp[key], ref[key], msg=key)


def test_host_stays_out_of_owner_state(tiny_ckpts):
    host = get_host(tiny_ckpts["gqa_untied"])
    owner = torch.nn.Module()
    owner.proj = torch.nn.Linear(4, 4)
    owner.llm = host
    assert set(owner.state_dict()) == {"proj.weight", "proj.bias"}
    assert len(list(owner.parameters())) == 2 and len(list(owner.buffers())) == 0
    owner.train()
    assert not host.gpt.training


def test_sharded_bf16_checkpoint_is_read_slice_by_slice_in_its_dtype(tmp_path, monkeypatch):
    """A bf16 checkpoint split over several files (index json): every read is one tensor in bf16, never a whole
    file or an fp32 copy, and the fp32 host matches transformers' fp32 upcast of the same weights."""
    from transformers import LlamaForCausalLM

    src = make_tiny_llama(tmp_path / "fp32", seed=7, num_key_value_heads=2)
    bf16 = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16", max_shard_size="60KB")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp_path / "bf16" / f.name)
    ckpt = tmp_path / "bf16"
    assert len(set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2

    reads = []

    def recording_read_slice(file, piece, tp_size, rank):
        t = read_slice(file, piece, tp_size, rank)
        reads.append((piece.hf_name, t.dtype, t.numel()))
        return t

    read_slice = convert.read_slice
    monkeypatch.setattr(convert, "read_slice", recording_read_slice)
    host = LLMHost(ckpt, tp_size=1, params_dtype=torch.float32)
    spec = host.spec
    assert {dtype for _, dtype, _ in reads} == {torch.bfloat16}
    assert len(reads) == 2 + 9 * spec.num_layers + (0 if spec.tie_word_embeddings else 1)  # one read per HF tensor
    assert sum(n for _, _, n in reads) == sum(p.numel() for p in host.llm_parameters())
    assert all(p.dtype == torch.float32 for p in host.llm_parameters())
    compare_with_transformers(ckpt, CORPUS[:3], host=host)


def _graph_nodes(t: torch.Tensor) -> set:
    """Names of the autograd nodes behind ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def test_activation_recompute_same_loss_and_grad(tiny_ckpts):
    """model.llm.activation_recompute: megatron's CheckpointFunction holds each layer (one per checkpoint) in
    the graph; loss and input gradient are those without recompute; no-grad calls and the layers stay eval."""
    ckpt = tiny_ckpts["gqa_untied"]
    host = LLMHost(ckpt, tp_size=1, params_dtype=torch.float32, activation_recompute=True)
    plain = get_host(ckpt)
    ids, lengths, labels = probe_inputs(host.vocab_size)
    results = {}
    for name, h in (("recompute", host), ("plain", plain)):
        x = h.embed(ids).detach().requires_grad_(True)  # [B, L, H]
        token_loss, loss = h.forward_embeds(x, labels, lengths=lengths)
        nodes = _graph_nodes(loss)
        loss.backward()
        results[name] = (token_loss.detach(), x.grad, nodes)
    assert "CheckpointFunctionBackward" in results["recompute"][2]
    assert "CheckpointFunctionBackward" not in results["plain"][2]
    torch.testing.assert_close(results["recompute"][0], results["plain"][0], atol=0, rtol=0)
    torch.testing.assert_close(results["recompute"][1], results["plain"][1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(host.score(CORPUS[:2]), plain.score(CORPUS[:2]), atol=0, rtol=0)
    assert not host.gpt.training and not any(m.training for m in host.gpt.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with CUDA")
def test_cpu_patches_idempotent():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import random as mrandom

    assert apply_cpu_patches() and apply_cpu_patches()
    assert RotaryEmbedding.get_emb.__module__ == "nemo_ctcllm.llm.compat"
    with mrandom.get_cuda_rng_tracker().fork():
        pass


# ----------------------------------------------------------------------------- errors


def test_error_missing_checkpoint(tmp_path):
    with pytest.raises(LLMCheckpointError, match="not found.*does_not_exist"):
        LLMHost(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMCheckpointError, match="config.json"):
        LLMHost(tmp_path / "empty")


def test_error_missing_weights_or_tokenizer(tiny_ckpts, tmp_path):
    shutil.copy(tiny_ckpts["gqa_untied"] / "config.json", tmp_path / "config.json")
    with pytest.raises(LLMCheckpointError, match="cannot load the tokenizer from"):  # checked before the weights
        LLMHost(tmp_path)
    for f in tiny_ckpts["gqa_untied"].iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(LLMCheckpointError, match="no weights in .*model.safetensors"):
        LLMHost(tmp_path)


def test_error_not_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(LLMCheckpointError, match="only LLaMA.*gpt2"):
        LLMHost(tmp_path)


def test_error_unknown_rope_scaling(tiny_ckpts, tmp_path):
    cfg = json.loads((tiny_ckpts["gqa_untied"] / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMCheckpointError, match="unsupported rope scaling type 'yarn'"):
        convert.read_llama_spec(tmp_path)


def test_error_tokenizer_does_not_match_checkpoint(tiny_ckpts, tmp_path):
    """A tokenizer with more tokens than the checkpoint's embedding rows (copied from another model)."""
    import shutil

    from nemo_ctcllm.llm.host import validate_llm_folder

    shutil.copytree(tiny_ckpts["gqa_untied"], tmp_path / "llm")
    cfg = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 16}))
    with pytest.raises(LLMCheckpointError, match=r"the tokenizer does not match the checkpoint: it has \d+ tokens"):
        validate_llm_folder(tmp_path / "llm")
    validate_llm_folder(tiny_ckpts["gqa_untied"])  # the matching pair passes


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "num_attention_heads",
            4,
            r"num_attention_heads=4 is not divisible by it; allowed sizes for this LLM: \[1, 2\]",
        ),
        (
            "num_key_value_heads",
            1,
            r"num_key_value_heads \(query groups\)=1 is not divisible by it; allowed sizes for "
            r"this LLM: \[1\]",
        ),
        ("intermediate_size", 99, r"intermediate_size \(ffn_hidden_size\)=99 is not divisible by it"),
        ("vocab_size", 129, r"vocab_size=129 is not divisible by it"),
    ],
)
def test_error_not_divisible_by_tp(tiny_ckpts, tmp_path, key, value, message):
    """Refused from config.json alone, before any process group is made or waited on (world size here is 1, so
    building a TP=3 / TP=2 group would fail differently)."""
    from nemo_ctcllm.llm.host import validate_llm_folder

    shutil.copytree(tiny_ckpts["gqa_untied"], tmp_path / "llm")
    cfg = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**cfg, key: value}))
    tp = 3 if key == "num_attention_heads" else 2  # 4 heads in 2 groups: TP=2 would be fine
    full = rf"model.llm.tensor_model_parallel_size={tp}: the LLM's {message}"
    with pytest.raises(LLMCheckpointError, match=full):
        validate_llm_folder(tmp_path / "llm", tp)
    with pytest.raises(LLMCheckpointError, match=full):
        LLMHost(tmp_path / "llm", tp_size=tp)


def test_error_wrong_or_unexpected_tensor(tiny_ckpts, tmp_path):
    """Every HF tensor's full shape is checked before its slice is read, and nothing is silently left over."""
    from safetensors.torch import load_file, save_file

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(tiny_ckpts["gqa_untied"], folder)
        sd = load_file(folder / "model.safetensors")
        edit(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    down = "model.layers.1.mlp.down_proj.weight"
    folder = broken("short", lambda sd: sd.__setitem__(down, sd[down][:, :-2].contiguous()))
    with pytest.raises(
        LLMCheckpointError,
        match=rf"HF tensor '{down}' in .*short.* has shape \(64, 94\), "
        r"expected \(64, 96\)",
    ):
        LLMHost(folder, tp_size=1)
    folder = broken("extra", lambda sd: sd.__setitem__("model.layers.2.mlp.up_proj.weight", sd[down].clone()))
    with pytest.raises(LLMCheckpointError, match=r"unexpected tensors in HF checkpoint .*extra.*layers\.2"):
        LLMHost(folder, tp_size=1)
    folder = broken("missing", lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(LLMCheckpointError, match=r"missing tensor\(s\) \['model.norm.weight'\]"):
        LLMHost(folder, tp_size=1)


def test_error_world_size_not_divisible(tiny_ckpts):
    from nemo_ctcllm.llm import init_model_parallel

    get_host(tiny_ckpts["gqa_untied"])  # makes sure a world-size-1 process group exists
    with pytest.raises(ValueError, match="world size 1 is not divisible by LLM tensor-parallel size 2"):
        init_model_parallel(2)
    with pytest.raises(ValueError, match="world size 1 is not divisible"):
        LLMHost(tiny_ckpts["gqa_untied"], tp_size=2)


# ----------------------------------------------------------------------------- tensor parallel


def _torchrun(nproc: int, checkpoints, out: Path, timeout: int, *flags: str):
    torchrun(TESTS_DIR / "llm_tp_worker.py", ["--out", out, *flags, *checkpoints], nproc, timeout)
    return torch.load(out, weights_only=True)


def _assert_same_as_tp1(results, checkpoints, tp, atol, suffixes=("",)):
    """Every result came from a TP=``tp`` host and equals the in-process TP=1 host's."""
    assert set(results) == {str(c) + s for c in checkpoints for s in suffixes}
    for ckpt in checkpoints:
        ref = run_probe(get_host(ckpt))
        assert ref["tp_size"] == 1
        for suffix in suffixes:
            got = results[str(ckpt) + suffix]
            assert got["tp_size"] == tp and got["llm_grads"] == 0
            for key in ("token_loss", "loss", "grad", "pooled", "score"):
                torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=1e-4, msg=f"{ckpt.name}{suffix}: {key}")


def _skip_without_gpus(n: int):
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        pytest.skip(f"TP={n} on CUDA needs {n} GPUs (the CPU/gloo variant runs on CPU-only machines)")


def test_tp2_matches_tp1(tiny_ckpts, tmp_path):
    """Every tiny variant (GQA/MHA, tied/untied, llama3 RoPE) at TP=2, with and without activation recompute."""
    _skip_without_gpus(2)
    ckpts = list(tiny_ckpts.values())
    results = _torchrun(2, ckpts, tmp_path / "tp2.pt", 600, "--also-recompute")
    _assert_same_as_tp1(results, ckpts, tp=2, atol=1e-5, suffixes=("", "#recompute"))


@pytest.mark.skipif(os.environ.get("LLM_TEST_TP3") != "1", reason="slow on 2 CPU cores; set LLM_TEST_TP3=1")
def test_tp3_smollm2_matches_tp1(smollm2_dir, tmp_path):
    _skip_without_gpus(3)
    results = _torchrun(3, [smollm2_dir], tmp_path / "tp3.pt", 600)
    _assert_same_as_tp1(results, [smollm2_dir], tp=3, atol=1e-4)


def test_single_process_group_ignores_an_inherited_master_port():
    """A script run by a process that holds a process group inherits MASTER_PORT, which that parent is still
    listening on: the host's own world-size-1 group must take a fresh port instead of failing with EADDRINUSE."""
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(busy.getsockname()[1]))
        code = "from nemo_ctcllm.llm.host import init_single_process_distributed as f; f(); print('group ok')"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "group ok" in proc.stdout, proc.stderr[-3000:]


def test_bf16_host_is_entirely_bf16_and_recompute_matches_under_autocast(tiny_ckpts):
    """A bf16 LLM has every parameter in bf16 (megatron's torch-norm wrapper alone would leave the RMSNorms fp32),
    scores close to the fp32 host, and under autocast activation recompute gives the loss and input gradient of the
    run without it (the host runs outside autocast, so CheckpointFunction's re-run sees the same precision)."""
    ckpt = tiny_ckpts["gqa_untied"]
    hosts = {r: LLMHost(ckpt, tp_size=1, params_dtype=torch.bfloat16, activation_recompute=r) for r in (False, True)}
    dtypes = {n: p.dtype for n, p in hosts[False].gpt.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    assert any("norm" in n for n in dtypes)
    torch.testing.assert_close(hosts[False].score(CORPUS[:2]), get_host(ckpt).score(CORPUS[:2]), atol=0.1, rtol=0.02)
    ids, lengths, labels = probe_inputs(hosts[False].vocab_size)
    results = {}
    for recompute, host in hosts.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = host.embed(ids).detach().float().requires_grad_(True)  # [B, L, H]
            token_loss, loss = host.forward_embeds(x, labels, lengths=lengths)
        loss.backward()
        results[recompute] = (token_loss.detach(), x.grad)
    torch.testing.assert_close(results[True][0], results[False][0], atol=0, rtol=0)
    torch.testing.assert_close(results[True][1], results[False][1], atol=0, rtol=0)
