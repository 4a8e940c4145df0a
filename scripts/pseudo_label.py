#!/usr/bin/env python
"""Pseudo-label untranscribed audio with a trained model (optionally with an LLM ranking its N-best).

    # greedy labels (self-training), all lines kept
    python scripts/pseudo_label.py --model model.nemo --manifest unlabelled.json --out-dir pl/

    # the N-best ranked by a + λ·log p_LLM, the 80 % most confident labels kept
    python scripts/pseudo_label.py --model model.nemo --manifest unlabelled.json --out-dir pl/ \\
        --llm artifacts/llm/smollm2-135m --nbest 8 --llm-weight 0.5 --keep-fraction 0.8

    # a teacher averaged over checkpoints (TopIPL), in 4 shards (4 machines or processes), then merged
    python scripts/pseudo_label.py --model run.nemo --checkpoint a.ckpt --checkpoint b.ckpt ... --shard 0/4
    python scripts/pseudo_label.py --manifest unlabelled.json --out-dir pl/ --merge

Writes into --out-dir: ``pseudo_labels.json`` (a NeMo training manifest: audio_filepath, duration, text = the
label, pl_confidence, pl_source) and ``summary.json`` (counts, settings, rate; where the input lines have text, the
labels' WER against it — measured after labelling, never used for it). A rerun resumes where a killed one stopped;
under torchrun every rank labels one shard and rank 0 merges. Method: nemo_ctcllm/pseudo_label.py and
docs/pseudo_labels.md.
"""

import argparse
import json
import os
import sys
import time

from nemo_ctcllm import pseudo_label as pl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the teacher: a .nemo (training or exported)")
    ap.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="a Lightning .ckpt of --model's run (repeatable): their weights averaged replace the .nemo's",
    )
    ap.add_argument("--manifest", action="append", required=True, help="NeMo manifest of audio (repeatable)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--llm", help="local Hugging Face LLaMA folder: rank the N-best by a + λ·log p_LLM")
    d = pl.LabelSettings()
    ap.add_argument("--nbest", type=int, default=d.nbest, help="N (default: %(default)s)")
    ap.add_argument("--llm-weight", type=float, default=d.llm_weight, help="λ (default: %(default)s)")
    ap.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="of the confidence (default: 1); a labelled dev set's summary.json gives a fitted one",
    )
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="utterances per acoustic forward")
    ap.add_argument("--block-size", type=int, default=d.block_size, help="utterances per unit of work/resume")
    ap.add_argument("--llm-batch-size", type=int, default=d.llm_batch_size, help="hypotheses per LLM forward")
    ap.add_argument("--min-confidence", type=float, help="keep labels with at least this confidence")
    ap.add_argument("--keep-fraction", type=float, help="keep this fraction of all lines, the most confident")
    ap.add_argument("--shard", help="i/n: label every n-th block from the i-th (default: torchrun's rank, or all)")
    ap.add_argument("--merge", action="store_true", help="only merge finished shards, filter and write the outputs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        settings = pl.LabelSettings(
            nbest=args.nbest,
            llm_weight=args.llm_weight,
            batch_size=args.batch_size,
            block_size=args.block_size,
            llm_batch_size=args.llm_batch_size,
        )
        pl.check_settings(settings)
        pl.select([], args.min_confidence, args.keep_fraction)  # the filter's own checks, before any work
        pl.confidence({"scores": [0.0], "tokens": [1], "chosen": 0}, args.temperature)  # and the temperature's
        shard = pl.parse_shard(args.shard)
        run = None
        if not args.merge:
            if not args.model:
                ap.error("--model is required (except with --merge)")
            run = label(args, settings, shard)
            if shard[1] > 1:
                if shard[0] != 0 or "RANK" not in os.environ:
                    print(f"shard {shard[0]}/{shard[1]} done; merge with --merge when every shard is")
                    return None
                wait_for_shards(args, settings, shard[1])  # torchrun: rank 0 merges once every rank is done
        summary = pl.finalize(
            args.manifest, args.out_dir, args.min_confidence, args.keep_fraction, run, temperature=args.temperature
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    keys = ("utterances", "kept", "dropped_empty", "dropped_filter", "kept_hours", "mean_confidence")
    print(json.dumps({k: summary[k] for k in keys}))
    if "against_manifest_text" in summary:
        t = summary["against_manifest_text"]
        print(
            f"labels vs the manifests' text: WER {100 * t['label_wer_all']:.2f} % (all), {t['label_wer_kept']} (kept)"
        )
        print(f"fitted temperature (use it as --temperature for audio of this kind): {t['fitted_temperature']}")
    print(f"wrote {os.path.join(args.out_dir, pl.MANIFEST)} and {pl.SUMMARY}")
    return summary


def label(args, settings, shard):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = pl.load_teacher(args.model, args.checkpoint)
    host = None
    if args.llm:
        from nemo_ctcllm.llm import LLMHost

        if not os.path.isdir(args.llm):
            raise FileNotFoundError(f"--llm: no such folder: {args.llm}")
        try:
            host = LLMHost(args.llm, tp_size=1)
        except Exception as e:  # a folder that does not hold a loadable LLaMA checkpoint
            raise RuntimeError(f"--llm {args.llm}: the LLM does not load ({type(e).__name__}: {e})") from e
    teacher = pl.file_digest(args.model) + "".join("+" + pl.file_digest(c) for c in args.checkpoint)
    return pl.label_shard(
        model, args.manifest, args.out_dir, settings, host, shard, teacher, progress=not args.no_progress
    )


def wait_for_shards(args, settings, shards, poll_s=10.0):
    """Rank 0 under torchrun: wait (no collective, so no timeout) until every shard's blocks are labelled."""
    n = len(pl.read_inputs(args.manifest))
    while True:
        try:
            pl.collect(args.out_dir, n, settings.block_size, shards)
            return
        except RuntimeError:
            time.sleep(poll_s)


if __name__ == "__main__":
    main()
