#!/usr/bin/env python
"""Export a training .nemo for inference: drops every training-only module (heads, connectors; the LLM is
never saved). Without self-conditioning the output is a plain NeMo EncDecCTCModelBPE.

    python scripts/export.py --src nemo_experiments/.../Conformer-CTC-LLM-BPE.nemo --dst model.nemo
"""

import argparse

from nemo_ctcllm.export import export_for_inference


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="training .nemo (EncDecCTCLLMModelBPE)")
    p.add_argument("--dst", required=True, help="inference .nemo to write")
    args = p.parse_args()
    cls = export_for_inference(args.src, args.dst)
    print(f"wrote {args.dst} ({cls})")


if __name__ == "__main__":
    main()
