#!/usr/bin/env python3
"""Generate the embedded demo speech corpus (synthetic speech + NeMo manifests).

Engines: espeak-ng and flite for train/dev/test, festival for test_unseen_engine
(Debian packages: espeak-ng flite festival festvox-kallpc16k sox; optional extra festival voices:
festvox-kdlpc16k festvox-us-slt-hts). See demo/corpus.py for voices per split.

Example::

    python -m demo.make_demo_data --out demo_data            # defaults: 10000/200/300/200
    python -m demo.make_demo_data --out /tmp/tiny --num-train 12 --num-dev 4 \
        --num-test 4 --num-test-unseen-engine 4 --force
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from demo.corpus import EngineNotFoundError, make_demo_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Generate the nemo_ctcllm demo speech corpus.")
    p.add_argument("--out", default="demo_data", help="output directory (default: demo_data)")
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--num-dev", type=int, default=200)
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--num-test-unseen-engine", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="parallel synthesis pipelines (default 2)")
    p.add_argument("--force", action="store_true", help="regenerate even if an identical corpus exists")
    p.add_argument(
        "--relative-paths",
        action="store_true",
        help="write audio_filepath relative to the manifest directory (default: absolute)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)

    params_json = os.path.join(args.out, "params.json")
    before = os.stat(params_json).st_mtime_ns if os.path.exists(params_json) else None
    t0 = time.time()
    try:
        manifests = make_demo_corpus(
            args.out,
            num_train=args.num_train,
            num_dev=args.num_dev,
            num_test=args.num_test,
            num_test_unseen_engine=args.num_test_unseen_engine,
            seed=args.seed,
            workers=args.workers,
            force=args.force,
            relative_paths=args.relative_paths,
            progress=not args.no_progress,
        )
    except EngineNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.time() - t0
    if before is not None and os.stat(params_json).st_mtime_ns == before:
        print(f"{args.out}: up to date (same parameters; use --force to regenerate)")
    with open(os.path.join(args.out, "stats.json")) as f:
        stats = json.load(f)
    for split, path in manifests.items():
        s = stats["splits"][split]
        print(
            f"{split:>18}: {s['utterances']:5d} utts {s['hours']:.3f} h  mean {s['mean_duration_s']:.2f} s  "
            f"{s['num_voices']:3d} voices  {path}"
        )
    print(f"{'total':>18}: {stats['total']['utterances']:5d} utts {stats['total']['hours']:.3f} h  ({wall:.1f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
