#!/usr/bin/env python
"""Inference parity of the exported ablation models against plain NeMo CTC (issue: "no inference cost").

For each exported model (default: every ``<work>/<run>_s<seed>/inference.nemo`` of benchmarks/ablate.py) and a
reference plain ``EncDecCTCModelBPE`` of the same size (default: the plain_ctc run's export): the class it
restores as, its parameter count, its ``.nemo`` size and its transcription throughput (seconds of audio per
wall-clock second, ``model.transcribe`` on a manifest, batch 16, greedy CTC), each as a ratio to the
reference. Rounds are interleaved (every model once per round, median over rounds), so that load from other
processes hits every model alike, and each round starts at the next model, so that no model always runs first
(right after the previous round's last); every round's throughput is kept in the output file.

    python -m benchmarks.bench_export                                  # ablation exports vs plain_ctc s0
    python -m benchmarks.bench_export --models a.nemo b.nemo --reference plain.nemo \
        --manifest demo_data/dev_manifest.json
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(REPO, "artifacts", "ablation"), help="benchmarks/ablate.py's --work")
    p.add_argument("--models", nargs="*", help=".nemo files (default: every inference.nemo under --work)")
    p.add_argument("--reference", help="plain EncDecCTCModelBPE .nemo (default: <work>/plain_ctc_s0/inference.nemo)")
    p.add_argument("--manifest", default=os.path.join(REPO, "demo_data", "dev_manifest.json"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(REPO, "docs", "results", "export_parity.json"))
    args = p.parse_args(argv)

    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401  (registers the model class for restore)
    from nemo_ctcllm.data.manifest import read_manifest, resolve_audio_path

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    reference = args.reference or os.path.join(args.work, "plain_ctc_s0", "inference.nemo")
    models = args.models or sorted(glob.glob(os.path.join(args.work, "*", "inference.nemo")))
    paths = [reference] + [m for m in models if os.path.abspath(m) != os.path.abspath(reference)]
    for path in paths:
        if not os.path.isfile(path):
            sys.exit(f"bench_export: {path} does not exist (train and export it with benchmarks/ablate.py first)")
    entries = read_manifest(args.manifest)
    audio = [resolve_audio_path(e["audio_filepath"], args.manifest) for e in entries]
    seconds = sum(float(e["duration"]) for e in entries)

    loaded = {}
    for path in paths:
        model = ASRModel.restore_from(path, map_location="cpu").eval()
        model.transcribe(audio[:4], batch_size=4, verbose=False)  # warm-up
        loaded[path] = model
    speed = {path: [] for path in paths}
    order = list(loaded)
    for r in tqdm(range(args.rounds), desc="rounds", file=sys.stdout):
        for path in order[r % len(order) :] + order[: r % len(order)]:
            model = loaded[path]
            start = time.perf_counter()
            model.transcribe(audio, batch_size=16, verbose=False)
            speed[path].append(seconds / (time.perf_counter() - start))

    def label(path):
        return os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "inference.nemo" else path

    ref = loaded[reference]
    ref_params = sum(q.numel() for q in ref.parameters())
    ref_speed = statistics.median(speed[reference])
    rows = []
    for path, model in loaded.items():
        params = sum(q.numel() for q in model.parameters())
        rows.append(
            {
                "model": label(path),
                "class": type(model).__name__,
                "params": params,
                "params_ratio": params / ref_params,
                "nemo_bytes": os.path.getsize(path),
                "nemo_size_ratio": os.path.getsize(path) / os.path.getsize(reference),
                "audio_s_per_s": statistics.median(speed[path]),
                "throughput_ratio": statistics.median(speed[path]) / ref_speed,
                "audio_s_per_s_rounds": [round(v, 1) for v in speed[path]],
            }
        )
    result = {
        "reference": label(reference),
        "manifest": os.path.relpath(args.manifest, REPO),
        "audio_seconds": round(seconds, 1),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"reference: {result['reference']}; {len(entries)} utterances, {seconds:.0f} s of audio, "
        f"median of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads"
    )
    print("| exported model | class | parameters | × ref | .nemo MB | × ref | audio s / s | throughput × ref |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['class']} | {r['params']:,} | {r['params_ratio']:.3f} | "
            f"{r['nemo_bytes'] / 1e6:.1f} | "
            f"{r['nemo_size_ratio']:.3f} | {r['audio_s_per_s']:.0f} | {r['throughput_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
