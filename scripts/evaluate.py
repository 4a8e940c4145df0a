#!/usr/bin/env python
"""WER/CER of a .nemo on one or more NeMo manifests; writes per-utterance predictions.

    python scripts/evaluate.py --model model.nemo --manifest demo_data/test_manifest.json --out-dir eval/

Greedy CTC decoding (what the exported model does on its own). With ``--llm DIR`` every utterance is also decoded
by N-best LLM rescoring, and both WERs are reported: the N best label sequences of the CTC posteriors (prefix beam
search, beam = N), each scored a + λ·l with a = log p_CTC(y | x) and l = the LLM's log-likelihood of its text
(+ EOS), the best one kept:

    python scripts/evaluate.py --model model.nemo --manifest demo_data/test_manifest.json --out-dir eval/ \\
        --llm artifacts/llm/smollm2-135m --nbest 8 --llm-weight 0.5
"""

import argparse
import json
import math
import os

from nemo_ctcllm.evaluate import evaluate


def _nbest(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return n


def _weight(value: str) -> float:
    w = float(value)
    if not math.isfinite(w):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return w


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=".nemo file (EncDecCTCLLMModelBPE or plain EncDecCTCModelBPE)")
    p.add_argument("--manifest", action="append", required=True, help="manifest to score (repeatable)")
    p.add_argument("--out-dir", default=None, help="writes <manifest name>.predictions.jsonl and summary.json here")
    p.add_argument("--batch-size", type=int, default=16)
    g = p.add_argument_group("N-best LLM rescoring (optional)")
    g.add_argument("--llm", default=None, help="local Hugging Face LLaMA folder: also decode with N-best rescoring")
    g.add_argument("--nbest", type=_nbest, default=8, help="hypotheses per utterance (default: %(default)s)")
    g.add_argument(
        "--llm-weight",
        type=_weight,
        default=0.5,
        help="λ in a + λ·l; 0 keeps the N-best's acoustic top (default: %(default)s)",
    )
    g.add_argument("--length-normalize", action="store_true", help="LLM score per LLM token instead of summed")
    args = p.parse_args(argv)

    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401

    model = ASRModel.restore_from(args.model, map_location="cpu")
    host = None
    if args.llm:
        from nemo_ctcllm.llm import LLMHost

        host = LLMHost(args.llm, tp_size=1)
    summary = {}
    for manifest in args.manifest:
        name = os.path.splitext(os.path.basename(manifest))[0]
        out = None
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            out = os.path.join(args.out_dir, f"{name}.predictions.jsonl")
        summary[name] = evaluate(
            model,
            manifest,
            out_path=out,
            batch_size=args.batch_size,
            llm_host=host,
            nbest=args.nbest,
            llm_weight=args.llm_weight,
            length_normalize=args.length_normalize,
        )
    print(f"{'split':<32} {'utts':>6} {'WER %':>7} {'CER %':>7}")
    for name, s in summary.items():
        print(f"{name:<32} {s['utterances']:>6} {100 * s['wer']:>7.2f} {100 * s['cer']:>7.2f}")
        if "llm_rescored" in s:
            r = s["llm_rescored"]
            label = f"  + LLM (N={r['nbest']}, λ={r['llm_weight']:g})"
            print(f"{label:<32} {r['utterances']:>6} {100 * r['wer']:>7.2f} {100 * r['cer']:>7.2f}")
    if args.out_dir:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
