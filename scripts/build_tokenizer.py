#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer on manifests' transcripts, in NeMo's folder layout.

    python scripts/build_tokenizer.py --manifest demo_data/train_manifest.json --vocab-size 128 \
        --out artifacts/tokenizers
prints the tokenizer folder (use it as model.tokenizer.dir).
"""

import argparse

from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", required=True, help="NeMo manifest(s) with 'text' (repeatable)")
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--out", default="artifacts/tokenizers")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = p.parse_args()
    print(build_bpe_tokenizer(args.manifest, args.out, args.vocab_size, force=args.force))


if __name__ == "__main__":
    main()
