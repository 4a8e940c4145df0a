#!/usr/bin/env python
"""How often the LLM changes the top CTC hypothesis on a dev manifest (and the WER of each choice).

    python -m benchmarks.llm_top_changed --model exp/model.nemo --manifest demo_data/dev_manifest.json \
        --llm artifacts/llm/smollm2-135m --nbest 4,8,16 --lm-weight 0.25,0.5,1.0

Prints, per N-best size and LM weight λ: the fraction of utterances where argmax(a + λ·l) differs from the
acoustic best, and the WER of the acoustic top, the LLM-rescored top and the N-best oracle.
"""
import argparse
import json
import os


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

    import torch
    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401
    from nemo_ctcllm.decoding.llm_rerank import llm_top_changed
    from nemo_ctcllm.llm import LLMHost

    model = ASRModel.restore_from(args.model, map_location="cuda" if torch.cuda.is_available() else "cpu")
    host = LLMHost(args.llm, tp_size=1)
    stats = llm_top_changed(model, host, args.manifest, nbest=[int(x) for x in args.nbest.split(",")],
                            lm_weights=[float(x) for x in args.lm_weight.split(",")],
                            length_normalize=args.length_normalize, batch_size=args.batch_size)
    print(f"{'setting':<16} {'utts':>5} {'top changed %':>14} {'WER acoustic %':>15} {'WER rescored %':>15} "
          f"{'WER oracle %':>13}")
    for name, s in stats.items():
        print(f"{name:<16} {s['utterances']:>5} {100 * s['top_changed']:>14.1f} {100 * s['wer_acoustic_top']:>15.2f} "
              f"{100 * s['wer_rescored_top']:>15.2f} {100 * s['wer_oracle']:>13.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": stats}, f, indent=2)


if __name__ == "__main__":
    main()
