#!/usr/bin/env python
"""WER/CER of a .nemo on one or more NeMo manifests; writes per-utterance predictions.

    python scripts/evaluate.py --model model.nemo --manifest demo_data/test_manifest.json --out-dir eval/
"""
import argparse
import json
import os

from nemo_ctcllm.evaluate import evaluate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=".nemo file (EncDecCTCLLMModelBPE or plain EncDecCTCModelBPE)")
    p.add_argument("--manifest", action="append", required=True, help="manifest to score (repeatable)")
    p.add_argument("--out-dir", default=None, help="writes <manifest name>.predictions.jsonl and summary.json here")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()

    import nemo_ctcllm  # noqa: F401
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(args.model, map_location="cpu")
    summary = {}
    for manifest in args.manifest:
        name = os.path.splitext(os.path.basename(manifest))[0]
        out = None
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            out = os.path.join(args.out_dir, f"{name}.predictions.jsonl")
        summary[name] = evaluate(model, manifest, out_path=out, batch_size=args.batch_size)
    print(f"{'split':<32} {'utts':>6} {'WER %':>7} {'CER %':>7}")
    for name, s in summary.items():
        print(f"{name:<32} {s['utterances']:>6} {100 * s['wer']:>7.2f} {100 * s['cer']:>7.2f}")
    if args.out_dir:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
