#!/usr/bin/env python
"""How often the LLM changes the top CTC hypothesis on a dev manifest (and the WER of each choice).

    python -m benchmarks.llm_top_changed --model exp/model.nemo --manifest demo_data/dev_manifest.json \
        --llm artifacts/llm/smollm2-135m --nbest 4,8,16 --lm-weight 0.25,0.5,1.0

Prints, per N-best size and LM weight λ: the fraction of utterances where argmax(a + λ·l) differs from the
acoustic best, and the WER of the acoustic top, the LLM-rescored top and the N-best oracle (scores as in
:mod:`nemo_ctcllm.decoding.llm_rerank`; references and hypotheses normalised as in :mod:`nemo_ctcllm.evaluate`).
One setting of it is a user option: ``scripts/evaluate.py --llm DIR --nbest N --llm-weight λ``.
"""

import argparse
import json
import os
from typing import Dict, Sequence

import torch


def _errors(hyp: str, ref: str) -> int:
    from kaldialign import edit_distance

    from nemo_ctcllm.evaluate import normalize_text

    return int(edit_distance(normalize_text(ref).split(), normalize_text(hyp).split())["total"])


@torch.no_grad()
def llm_top_changed(
    model,
    host,
    manifest: str,
    nbest: Sequence[int] = (4, 8, 16),
    lm_weights: Sequence[float] = (0.5,),
    length_normalize: bool = False,
    batch_size: int = 16,
) -> Dict[str, Dict[str, float]]:
    """{"n<N>_lm<λ>": {top_changed, wer_acoustic_top, wer_rescored_top, wer_oracle, utterances}}."""
    from nemo_ctcllm.decoding.llm_rerank import audio_batches, score_nbest
    from nemo_ctcllm.evaluate import normalize_text

    model.eval()
    device = next(model.parameters()).device
    llm_cache: Dict[str, float] = {}
    acc = {(n, lam): {"changed": 0, "acoustic": 0, "rescored": 0, "oracle": 0} for n in nbest for lam in lm_weights}
    utts = words = 0
    for signal, lens, entries in audio_batches(manifest, batch_size):
        refs = [e.get("text", "") for e in entries]
        log_probs, enc_len, _ = model.forward(input_signal=signal.to(device), input_signal_length=lens.to(device))
        utts += len(refs)
        words += sum(len(normalize_text(r).split()) for r in refs)
        for n in nbest:
            scored = score_nbest(log_probs, enc_len, model.tokenizer, host, n, length_normalize, llm_cache)
            errs = torch.tensor([[_errors(t, r) for t in row] for row, r in zip(scored.texts, refs)]).float()
            errs = errs.masked_fill(~scored.valid, float("inf"))  # [B, N]
            top = scored.best(0.0)
            rows = torch.arange(len(refs))
            for lam in lm_weights:
                best = scored.best(lam)
                s = acc[(n, lam)]
                s["changed"] += int((best != top).sum())
                s["acoustic"] += int(errs[rows, top].sum())
                s["rescored"] += int(errs[rows, best].sum())
                s["oracle"] += int(errs.min(1).values.sum())
    words = max(words, 1)
    return {
        f"n{n}_lm{lam}": {
            "top_changed": s["changed"] / max(utts, 1),
            "wer_acoustic_top": s["acoustic"] / words,
            "wer_rescored_top": s["rescored"] / words,
            "wer_oracle": s["oracle"] / words,
            "utterances": utts,
        }
        for (n, lam), s in acc.items()
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=".nemo file (EncDecCTCLLMModelBPE or plain EncDecCTCModelBPE)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--llm", required=True, help="local Hugging Face LLaMA folder (e.g. the demo's SmolLM2)")
    p.add_argument("--nbest", default="4,8,16")
    p.add_argument("--lm-weight", default="0.5")
    p.add_argument("--length-normalize", action="store_true", help="LLM score per token instead of summed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401
    from nemo_ctcllm.llm import LLMHost

    model = ASRModel.restore_from(args.model, map_location="cuda" if torch.cuda.is_available() else "cpu")
    host = LLMHost(args.llm, tp_size=1)
    stats = llm_top_changed(
        model,
        host,
        args.manifest,
        nbest=[int(x) for x in args.nbest.split(",")],
        lm_weights=[float(x) for x in args.lm_weight.split(",")],
        length_normalize=args.length_normalize,
        batch_size=args.batch_size,
    )
    print(
        f"{'setting':<16} {'utts':>5} {'top changed %':>14} {'WER acoustic %':>15} {'WER rescored %':>15} "
        f"{'WER oracle %':>13}"
    )
    for name, s in stats.items():
        print(
            f"{name:<16} {s['utterances']:>5} {100 * s['top_changed']:>14.1f} {100 * s['wer_acoustic_top']:>15.2f} "
            f"{100 * s['wer_rescored_top']:>15.2f} {100 * s['wer_oracle']:>13.2f}"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": stats}, f, indent=2)


if __name__ == "__main__":
    main()
