#!/usr/bin/env python
"""Check NeMo manifests line by line, as training does before its first step (nemo_ctcllm.data.manifest).

    python scripts/validate_manifest.py demo_data/train_manifest.json \
        --tokenizer artifacts/tokenizers/tokenizer_spe_bpe_v128 --frame-shift 0.04

Prints one ``<manifest>:<line>: <reason>`` per bad line and a summary; exits 1 if any line is bad.
``--write-clean OUT`` also writes the usable lines (audio paths made absolute) to OUT.
"""

import argparse
import os
import sys

from nemo_ctcllm.data.manifest import CheckConfig, scan_manifest, write_manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="+")
    p.add_argument(
        "--tokenizer", help="SentencePiece tokenizer folder (tokenizer.model): unknown characters, CTC length"
    )
    p.add_argument(
        "--frame-shift",
        type=float,
        default=0.04,
        help="seconds per encoder output frame (window_stride x subsampling; 0 = skip the CTC length check)",
    )
    p.add_argument("--sample-rate", type=int, default=16000, help="expected sample rate (0 = any)")
    p.add_argument("--min-duration", type=float, default=0.05)
    p.add_argument("--max-duration", type=float, default=3600.0)
    p.add_argument("--no-audio", action="store_true", help="don't read audio headers")
    p.add_argument("--allow-unlabelled", action="store_true", help="lines without a 'text' key are fine")
    p.add_argument("--write-clean", metavar="OUT", help="write the usable lines of the (single) manifest here")
    args = p.parse_args(argv)
    if args.write_clean and len(args.manifests) != 1:
        p.error("--write-clean takes exactly one manifest")

    tokenizer = None
    if args.tokenizer:
        from nemo.collections.common.tokenizers import SentencePieceTokenizer

        model = os.path.join(args.tokenizer, "tokenizer.model")
        if not os.path.isfile(model):
            p.error(f"--tokenizer: no tokenizer.model in {args.tokenizer}")
        tokenizer = SentencePieceTokenizer(model)
    cfg = CheckConfig(
        require_text=not args.allow_unlabelled,
        min_duration=args.min_duration,
        max_duration=args.max_duration,
        frame_shift=(args.frame_shift or None) if tokenizer else None,
        tokenizer=tokenizer,
        check_audio=not args.no_audio,
        sample_rate=args.sample_rate or None,
    )
    bad = 0
    for manifest in args.manifests:
        if not os.path.isfile(manifest):
            print(f"{manifest}: manifest not found", file=sys.stderr)
            bad += 1
            continue
        report = scan_manifest(manifest, cfg)
        for problem in report.problems:
            print(problem)
        bad += len(report.problems)
        print(
            f"{manifest}: {len(report.good)} usable line(s) ({report.unlabelled} unlabelled), "
            f"{len(report.problems)} bad",
            file=sys.stderr,
        )
        if args.write_clean:
            write_manifest(report.good, manifest, args.write_clean)
            print(f"usable lines written to {args.write_clean}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
