"""Tests of the megatron-hosted LLM (``nemo_ctcllm.llm``) on CPU.

* tiny random LLaMAs (GQA/MHA, tied/untied, llama3 RoPE scaling) and the demo SmolLM2 reproduce
  transformers' ``LlamaForCausalLM`` logits and loss;
* TP=2 (torchrun, gloo) matches TP=1: per-token loss and d loss / d inputs_embeds;
  optional TP=3 on SmolLM2 (set ``LLM_TEST_TP3=1``);
* frozen LLM, clear errors, cache, state-dict hygiene, CPU shims.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from nemo_ctcllm.llm import LLMCheckpointError, LLMHost, apply_cpu_patches, write_cache  # noqa: E402
from nemo_ctcllm.llm import convert  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))
from llm_tp_worker import probe_inputs, run_probe  # noqa: E402
from conftest import LLM_CORPUS as CORPUS, make_tiny_llama  # noqa: E402

TINY_VARIANTS = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_tied_llama3rope": dict(
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
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
    """transformers logits [B, L, V] and mean next-token loss for right-padded ids [B, L]."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval().to(ids.device)
    valid = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]  # [B, L]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=valid.long(), labels=ids.masked_fill(~valid, -100),
                    output_hidden_states=True)
    return out.logits, out.loss, out.hidden_states[-1], valid


def compare_with_transformers(path, texts):
    host = get_host(path)
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
        ref_logits.double().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [B, L]
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
    compare_with_transformers(smollm2_dir, ["The quick brown fox jumps over the lazy dog.", "Hello world",
                                            "Speech recognition is fun."])


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


def test_cache_is_used(tiny_ckpts, tmp_path, monkeypatch):
    ckpt = tiny_ckpts["gqa_tied_llama3rope"]
    path = write_cache(ckpt, tmp_path)
    assert path.is_file() and write_cache(ckpt, tmp_path) == path  # idempotent
    spec, full = convert.load_full_state_dict(ckpt, tmp_path)
    ref = convert.hf_to_megatron(convert.load_hf_state_dict(ckpt), spec)
    assert full.keys() == ref.keys() and all(torch.equal(full[k], ref[k]) for k in ref)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted although a cache exists")

    monkeypatch.setattr(convert, "hf_to_megatron", no_conversion)
    host = LLMHost(ckpt, tp_size=1, params_dtype=torch.float32, cache_dir=tmp_path)
    torch.testing.assert_close(host.score(CORPUS[:2]), get_host(ckpt).score(CORPUS[:2]), atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with CUDA")
def test_cpu_patches_idempotent():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import random as mrandom

    assert apply_cpu_patches() and apply_cpu_patches()
    assert RotaryEmbedding.get_emb.__module__ == "nemo_ctcllm.llm.compat"
    with mrandom.get_cuda_rng_tracker().fork():
        pass
    assert not hasattr(torch.cuda, "_nemo_ctcllm_patched")


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


def test_error_not_divisible_by_tp(tiny_ckpts, tmp_path):
    with pytest.raises(LLMCheckpointError, match=r"tensor_model_parallel_size=3: the LLM's num_attention_heads=4 is not divisible by it; allowed sizes for this LLM: \[1, 2\]"):
        LLMHost(tiny_ckpts["gqa_untied"], tp_size=3)
    with pytest.raises(LLMCheckpointError, match=r"query groups\)=1 is not divisible by it; allowed sizes for this LLM: \[1\]"):
        LLMHost(tiny_ckpts["gqa_tied_llama3rope"], tp_size=2)
    cfg = json.loads((tiny_ckpts["gqa_untied"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 129}))
    with pytest.raises(LLMCheckpointError, match="vocab_size=129 is not divisible by it"):
        LLMHost(tmp_path, tp_size=2)


def test_error_world_size_not_divisible(tiny_ckpts):
    from nemo_ctcllm.llm import init_model_parallel

    get_host(tiny_ckpts["gqa_untied"])  # makes sure a world-size-1 process group exists
    with pytest.raises(ValueError, match="world size 1 is not divisible by LLM tensor-parallel size 2"):
        init_model_parallel(2)
    with pytest.raises(ValueError, match="world size 1 is not divisible"):
        LLMHost(tiny_ckpts["gqa_untied"], tp_size=2)


# ----------------------------------------------------------------------------- tensor parallel


def _torchrun(nproc: int, checkpoints, out: Path, timeout: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(TESTS_DIR / "llm_tp_worker.py"), "--out", str(out), *map(str, checkpoints)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True)


def _assert_same_as_tp1(results, checkpoints, atol):
    for ckpt in checkpoints:
        ref, got = run_probe(get_host(ckpt)), results[str(ckpt)]
        assert got["llm_grads"] == 0
        for key in ("token_loss", "loss", "grad", "pooled", "score"):
            torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=1e-4, msg=f"{ckpt.name}: {key}")


def _skip_without_gpus(n: int):
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        pytest.skip(f"TP={n} on CUDA needs {n} GPUs (the CPU/gloo variant runs on CPU-only machines)")


def test_tp2_matches_tp1(tiny_ckpts, tmp_path):
    _skip_without_gpus(2)
    ckpts = [tiny_ckpts["gqa_untied"], tiny_ckpts["mha_tied"]]  # 4 heads, 2 or 4 groups, vocab 128
    results = _torchrun(2, ckpts, tmp_path / "tp2.pt", timeout=240)
    _assert_same_as_tp1(results, ckpts, atol=1e-5)


@pytest.mark.skipif(os.environ.get("LLM_TEST_TP3") != "1", reason="slow on 2 CPU cores; set LLM_TEST_TP3=1")
def test_tp3_smollm2_matches_tp1(smollm2_dir, tmp_path):
    _skip_without_gpus(3)
    results = _torchrun(3, [smollm2_dir], tmp_path / "tp3.pt", timeout=400)
    _assert_same_as_tp1(results, [smollm2_dir], atol=1e-4)
