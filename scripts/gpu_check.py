#!/usr/bin/env python
"""The GPU check: one call on one GPU (about 8 minutes), every part's result in a JSON file.

    python scripts/gpu_check.py --out OUT --audio demo_data/gpu_check     # on the GPU machine (docs/scale.md)
    python scripts/gpu_check.py --out OUT --audio DIR --dry-run           # the same parts, tiny, on a CPU
    python scripts/gpu_check.py --make-audio demo_data/gpu_check          # synthesise the utterances (espeak-ng)

Parts (OUT/<part>.json each, and OUT/gpu_check.json with all of them; a failing part records its error and the
others still run):

* ``env``: torch / CUDA / GPU, the versions of NeMo and megatron-core, whether Transformer Engine and apex
  are importable, and the class of the LLM's final norm (what megatron built on this machine).
* ``host_vs_hf``: the megatron LLM host against Hugging Face on the same SmolLM2-135M-shaped checkpoint (random
  weights: the real 540 MB checkpoint cannot travel), per-token losses in the host's dtype (bf16 on GPU). The
  tolerance is relative to an fp32 Hugging Face reference: the host's error must be at most twice Hugging
  Face's own error in the same dtype (plus 1e-3 nats). A bf16 value has 8 significant bits (relative spacing
  2^-8 = 0.4 %), and two correct bf16 implementations that round in different places differ by about their
  own distance from the fp32 result; a wrong mapping (a transposed or misplaced weight, a wrong RoPE or norm)
  is off by whole nats.
* ``throughput``: forward + backward to the input embeddings (what the training objectives run) through the
  host, tokens/s and peak memory, for SmolLM2-135M and Llama-3.2-1B shapes (random weights built from their
  configs here: a 2.4 GB checkpoint cannot travel).
* ``train``: the recipe (conf/conformer_ctc_llm.yaml, unchanged model sizes) for ``--steps`` optimizer steps
  with ``trainer.precision=bf16-mixed`` and llm_prefix_clm + clip on the SmolLM2-shaped LLM, on the utterances
  in ``--audio``: median step time and peak memory.
* ``tests``: the test modules that branch on CUDA (``torch.cuda.is_available()``) run under pytest on this
  machine; pass/fail/skip counts and every skip reason. With ``--dry-run`` they are only collected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = ["env", "host_vs_hf", "throughput", "train", "tests"]

# Hugging Face config.json fields of the two LLM shapes (HuggingFaceTB/SmolLM2-135M, meta-llama/Llama-3.2-1B).
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
LLAMA_32_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
# --dry-run: the same code on shapes a CPU runs in seconds (the llama3 RoPE kept, so its path is exercised)
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY_LLAMA3 = dict(TINY, rope_scaling=LLAMA_32_1B["rope_scaling"])


def sentences() -> list[str]:
    lines = (REPO / "demo" / "sentences.txt").read_text().splitlines()
    return [s for s in lines if s.strip() and not s.startswith("#")]


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_peak() -> None:
    import torch

    if cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    """Peak GPU memory allocated since reset_peak() (CUDA), else the process's peak RSS (Linux KiB -> MiB)."""
    import torch

    if cuda():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync() -> None:
    import torch

    if cuda():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- random LLaMA folders


def write_random_llama(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A Hugging Face LLaMA folder with random weights of ``shape`` (bf16 safetensors, built on the GPU when there
    is one) and a word-level tokenizer over the shipped sentences (ids < vocab_size)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "tokenizer.json").is_file():  # written last: the folder is complete
        return folder
    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cuda" if cuda() else "cpu"):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm mapping cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(torch.bfloat16).save_pretrained(folder)
    del model
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(
        sentences(), trainers.WordLevelTrainer(vocab_size=shape["vocab_size"], special_tokens=specials)
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    return folder


def random_batch(vocab: int, batch: int, length: int, seed: int = 0):
    """Token ids [B, L] (no padding), labels [B, L] (next token, -100 at the end) and lengths [B]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels, torch.full((batch,), length)


# ----------------------------------------------------------------------------- parts


def part_env(args, work: Path) -> dict:
    import importlib.util

    import megatron.core
    import nemo
    import torch

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda() else "cpu",
        "nemo": nemo.__version__,
        "megatron_core": megatron.core.__version__,
        "transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
        "apex": importlib.util.find_spec("apex") is not None,
    }
    host = build_host(write_random_llama(work / "llm_small", args.small_shape))
    out["llm_final_norm"] = (
        type(host.gpt.decoder.final_layernorm).__module__ + "." + type(host.gpt.decoder.final_layernorm).__name__
    )
    out["llm_layer_norm"] = type(host.gpt.decoder.layers[0].input_layernorm).__name__
    return out


_HOSTS: dict = {}


def build_host(folder: Path):
    """One LLMHost per folder and process (megatron's parallel state is global)."""
    from nemo_ctcllm.llm import LLMHost

    if folder not in _HOSTS:
        _HOSTS.clear()
        _HOSTS[folder] = LLMHost(folder, tp_size=1)
    return _HOSTS[folder]


def hf_token_losses(folder: Path, ids, labels, dtype):
    """Per-token cross entropy [B, L] of the Hugging Face model (0 where labels are -100)."""
    import torch
    from transformers import LlamaForCausalLM

    device = "cuda" if cuda() else "cpu"
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits.float()  # [B, L, V]
    del model
    loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels.to(device), ignore_index=-100, reduction="none"
    )  # [B, L]
    return loss.cpu()


def part_host_vs_hf(args, work: Path) -> dict:
    import torch

    folder = write_random_llama(work / "llm_small", args.small_shape)
    host = build_host(folder)
    ids, labels, lengths = random_batch(args.small_shape["vocab_size"], 4, args.seq_len)
    with torch.no_grad():
        host_loss, _ = host.forward_embeds(
            host.embed(ids.to(host.device)), labels.to(host.device), lengths=lengths.to(host.device)
        )  # [B, L]
    host_loss = host_loss.float().cpu()
    ref = hf_token_losses(folder, ids, labels, torch.float32)  # [B, L]
    hf_low = hf_token_losses(folder, ids, labels, host.dtype)  # [B, L]
    valid = labels != -100
    host_err = (host_loss - ref)[valid].abs().max().item()
    hf_err = (hf_low - ref)[valid].abs().max().item()
    tolerance = 2 * hf_err + 1e-3
    return {
        "dtype": str(host.dtype),
        "tokens": int(valid.sum()),
        "mean_loss_fp32_hf": ref[valid].mean().item(),
        "mean_loss_host": host_loss[valid].mean().item(),
        "max_abs_err_host_vs_fp32": host_err,
        "max_abs_err_hf_same_dtype_vs_fp32": hf_err,
        "tolerance": tolerance,
        "ok": host_err <= tolerance,
    }


def fwd_bwd_rate(folder: Path, batch: int, seq_len: int, repeats: int) -> dict:
    """tokens/s of forward + backward to inputs_embeds through the host, and peak memory."""
    import torch

    _HOSTS.clear()
    if cuda():
        torch.cuda.empty_cache()
    reset_peak()
    host = build_host(folder)
    weights_mib = sum(p.numel() * p.element_size() for p in host.gpt.parameters()) / 2**20
    ids, labels, lengths = random_batch(host.vocab_size, batch, seq_len)
    ids, labels, lengths = ids.to(host.device), labels.to(host.device), lengths.to(host.device)

    def step():
        x = host.embed(ids).detach().requires_grad_(True)  # [B, L, H]: the objectives' prompt embeddings
        _, loss = host.forward_embeds(x, labels, lengths=lengths)
        loss.backward()
        return x.grad

    assert torch.isfinite(step()).all()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / repeats
    return {
        "batch": batch,
        "seq_len": seq_len,
        "weights_mib": round(weights_mib, 1),
        "ms_per_step": round(seconds * 1000, 2),
        "tokens_per_s": round(batch * seq_len / seconds, 1),
        "peak_mib": round(peak_mib(), 1),
        "dtype": str(host.dtype),
    }


def part_throughput(args, work: Path) -> dict:
    small = write_random_llama(work / "llm_small", args.small_shape)
    big = write_random_llama(work / "llm_1b", args.big_shape, seed=1)
    return {
        "smollm2_135m_shape": fwd_bwd_rate(small, args.batch, args.seq_len, args.repeats),
        "llama_3.2_1b_shape": fwd_bwd_rate(big, args.batch, args.seq_len, args.repeats),
    }


def audio_manifest(audio_dir: Path, out: Path) -> Path:
    """A NeMo manifest of ``audio_dir``'s utterances with absolute paths (the folder travels, so the paths in its
    own manifest.json are relative to it)."""
    src = audio_dir / "manifest.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no manifest; make one with scripts/gpu_check.py --make-audio {audio_dir}")
    lines = []
    for n, line in enumerate(src.read_text().splitlines(), 1):
        row = json.loads(line)
        wav = audio_dir / row["audio_filepath"]
        if not wav.is_file():
            raise FileNotFoundError(f"{src}:{n}: {wav} does not exist")
        lines.append(json.dumps(dict(row, audio_filepath=str(wav.resolve()))))
    out.write_text("\n".join(lines) + "\n")
    return out


def make_audio(folder: Path, count: int = 32) -> None:
    """Synthesise ``count`` demo utterances (espeak-ng/flite) into ``folder`` with a
    manifest.json whose paths are relative to it (demo/corpus.py)."""
    import shutil

    from demo.corpus import make_demo_corpus

    with tempfile.TemporaryDirectory() as tmp:
        manifests = make_demo_corpus(
            tmp, num_train=count, num_dev=2, num_test=2, num_test_unseen_engine=2, seed=0, workers=2, progress=False
        )
        train = Path(manifests["train"])
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for line in train.read_text().splitlines():
            row = json.loads(line)
            wav = Path(row["audio_filepath"])
            wav = wav if wav.is_absolute() else train.parent / wav
            shutil.copy(wav, folder / wav.name)
            rows.append(json.dumps(dict(row, audio_filepath=wav.name)))
    (folder / "manifest.json").write_text("\n".join(rows) + "\n")


class StepStats(pl.Callback):
    """Wall time and loss of each training batch."""

    def __init__(self):
        self.times, self.losses, self._t0 = [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        self.times.append(time.perf_counter() - self._t0)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()) if loss is not None else float("nan"))


def recipe_config(overrides: list[str]):
    """conf/conformer_ctc_llm.yaml composed by Hydra with ``overrides``, as scripts/train.py gets it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="conformer_ctc_llm", overrides=overrides)


# What NeMo's ASR collection imports beyond its core (pandas, scikit-learn -> scipy at import; librosa's mel filters
# -> numba -> llvmlite when the preprocessor is built): about 125 MiB of wheels, over what one call carries.
ASR_STACK = ["pandas", "scipy", "sklearn", "librosa", "numba"]


def require_asr_stack() -> None:
    import importlib.util

    missing = [m for m in ASR_STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"NeMo ASR needs {missing}, not installed here (docs/scale.md, 'The GPU check')")


def part_train(args, work: Path) -> dict:
    import statistics

    require_asr_stack()
    from nemo.utils.exp_manager import exp_manager
    from nemo.utils.trainer_utils import resolve_trainer_cfg

    from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer_from_texts
    from nemo_ctcllm.models import EncDecCTCLLMModelBPE
    from nemo_ctcllm.parallel import check_parallel
    from nemo_ctcllm.training import check_training_data

    _HOSTS.clear()
    manifest = audio_manifest(Path(args.audio), work / "train_manifest.json")
    tokenizer = build_bpe_tokenizer_from_texts(sentences(), str(work / "tokenizer"), vocab_size=128)
    llm = write_random_llama(work / "llm_small", args.small_shape)
    overrides = [
        f"model.train_ds.manifest_filepath={manifest}",
        f"model.validation_ds.manifest_filepath={manifest}",
        f"model.tokenizer.dir={tokenizer}",
        f"model.llm.checkpoint={llm}",
        "model.objectives.llm_prefix_clm.enabled=true",
        "model.objectives.clip.enabled=true",
        f"trainer.max_steps={args.steps}",
        f"trainer.precision={args.precision}",
        "trainer.devices=1",
        "trainer.check_val_every_n_epoch=1000",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.strategy=auto",
        "model.train_ds.num_workers=0",
        "model.train_ds.batch_duration=40",
        "model.train_ds.num_buckets=2",
        "model.train_ds.pin_memory=false",
        "model.validation_ds.num_workers=0",
        f"exp_manager.exp_dir={work / 'exp'}",
        "exp_manager.create_checkpoint_callback=false",
        "exp_manager.resume_if_exists=false",
        *args.train_overrides,
    ]
    cfg = recipe_config(overrides)
    pl.seed_everything(0, workers=True)
    check_parallel(cfg)
    stats = StepStats()
    trainer = pl.Trainer(**resolve_trainer_cfg(cfg.trainer), callbacks=[stats])
    exp_manager(trainer, cfg.get("exp_manager"))
    check_training_data(cfg, log_dir=str(work / "exp"))
    model = EncDecCTCLLMModelBPE(cfg=cfg.model, trainer=trainer)
    reset_peak()
    trainer.fit(model)
    steady = stats.times[1:] or stats.times  # the first step compiles kernels and builds the LLM host
    losses = stats.losses
    return {
        # the part's verdict: every step ran and every loss is finite (not merely "no exception")
        "ok": trainer.global_step == args.steps and bool(losses) and all(math.isfinite(x) for x in losses),
        "steps": trainer.global_step,
        "precision": args.precision,
        "objectives": ["ctc_final", "interctc", "llm_prefix_clm", "clip"],
        "encoder_params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "first_step_s": round(stats.times[0], 3) if stats.times else None,
        "median_step_s": round(statistics.median(steady), 4) if steady else None,
        "peak_mib": round(peak_mib(), 1),
        "first_loss": stats.losses[0] if stats.losses else None,
        "last_loss": stats.losses[-1] if stats.losses else None,
        "overrides": overrides,
    }


CUDA_BRANCH = re.compile(r"^\s*(if|@pytest\.mark\.skipif\()\s*.*torch\.cuda\.is_available\(\)", re.M)


def cuda_test_modules() -> list[str]:
    """Test modules whose behaviour depends on CUDA being present (an ``if`` or ``skipif`` on it)."""
    return sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if CUDA_BRANCH.search(p.read_text())
    )


def part_tests(args, work: Path) -> dict:
    import xml.etree.ElementTree as ET

    modules = cuda_test_modules()
    junit = work / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={junit}",
        *modules,
    ]
    if args.dry_run:
        cmd.append("--collect-only")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.tests_timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-4000:]
    out = {"modules": modules, "returncode": rc, "collect_only": args.dry_run, "output_tail": tail}
    if junit.is_file():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        out.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        out["skip_reasons"] = sorted({s.get("message", "") for s in root.iter("skipped")})
        out["failed"] = [
            f"{c.get('classname')}::{c.get('name')}"
            for c in root.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None
        ]
    collected = re.search(r"(\d+) tests? collected", tail)
    out["collected"] = int(collected.group(1)) if collected else None
    # the part's verdict is pytest's: exit 0, something collected, and no failure or error (a module that fails to
    # import is a collection error, not a collected test)
    out["ok"] = rc == 0 and bool(out["collected"] or out.get("tests")) and not out.get("failed")
    return out


# ----------------------------------------------------------------------------- main


def run_parts(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"dry_run": args.dry_run}
    for name in args.parts:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            res = {"ok": True, **globals()[f"part_{name}"](args, work)}
        except Exception as e:  # one broken part must not hide the others' numbers
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"[gpu_check] {name}: ok={res['ok']} in {res['seconds']} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for the JSON files")
    p.add_argument("--audio", default="demo_data/gpu_check", help="folder with wavs + manifest.json (--make-audio)")
    p.add_argument("--work", default=None, help="scratch folder (random LLM checkpoints, tokenizer, experiment)")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and 3 steps on whatever device is there")
    p.add_argument("--make-audio", metavar="DIR", help="synthesise the utterances into DIR and exit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tests-timeout", type=int, default=240, help="seconds for the test modules")
    p.add_argument("train_overrides", nargs="*", help="extra Hydra overrides for the training part")
    args = p.parse_args(argv)
    args.small_shape, args.big_shape = SMOLLM2_135M, LLAMA_32_1B
    args.batch, args.seq_len, args.repeats, args.precision = 8, 256, 5, "bf16-mixed"
    if args.dry_run:
        args.small_shape, args.big_shape = TINY, TINY_LLAMA3
        args.batch, args.seq_len, args.repeats, args.steps = 2, 16, 1, min(args.steps, 3)
        args.train_overrides = [
            "model.encoder.n_layers=2",
            "model.encoder.d_model=32",
            "model.encoder.n_heads=2",
            "model.encoder.conv_kernel_size=9",
            "model.encoder.ff_expansion_factor=2",
            "model.objectives.llm_prefix_clm.blocks=[2]",
            "model.objectives.llm_prefix_clm.weights=[1.0]",
            "model.objectives.interctc.blocks=[1]",
            "model.objectives.interctc.weights=[0.3]",
            "model.objectives.clip.dim=16",
            *args.train_overrides,
        ]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_audio:
        make_audio(Path(args.make_audio))
        print(f"wrote {args.make_audio}/manifest.json")
        return 0
    results = run_parts(args)
    failed = [k for k in args.parts if not results[k]["ok"]]
    print(json.dumps({k: results[k]["ok"] for k in args.parts}), "->", Path(args.out) / "gpu_check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
