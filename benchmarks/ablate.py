#!/usr/bin/env python
"""The ablation benchmark: every objective against plain CTC and the intermediate-CTC control, same encoder,
same data order and step budget; greedy-CTC WER of the exported model (no LLM); table and plots.

    python -m benchmarks.ablate                       # all runs of benchmarks.ablation.RUNS not yet finished
    python -m benchmarks.ablate --runs plain_ctc,interctc --seeds 0,1
    python -m benchmarks.ablate --summarise           # only rebuild the table and plots from docs/results/ablation
    python -m benchmarks.ablate --rescore             # score the finished runs' exports again, then rebuild
    python -m benchmarks.ablate --quick --work /tmp/q  # the whole pipeline on a tiny corpus and model (~2 min)
    python -m benchmarks.ablate --train-utterances 10000 --runs plain_ctc,interctc --seeds 0,1   # a larger corpus

The runs train on the first 3,000 training utterances of the demo corpus (--data; --train-utterances N for
another prefix) with a BPE-128 tokenizer built on them, both written under --work (`--prepare` writes only
these). Each corpus size is its own benchmark, named `ablation` for 3,000 and `ablation_<N>` otherwise: work
folder artifacts/<name>, results docs/results/<name>/, plots docs/results/<name>_{dev,test}_wer.png, and its
own section of docs/RESULTS.md between the <name> markers.
Each run trains with scripts/train.py in its own folder under --work (a killed run resumes where it stopped)
and writes <results>/<run>_s<seed>.json; finished runs are skipped.
"""

import argparse
import dataclasses
import os
import sys

from tqdm import tqdm

from benchmarks.ablation import (
    REPO,
    RUNS,
    TRAIN_UTTERANCES,
    load_results,
    prepare_corpus,
    rescore,
    result_path,
    run_one,
    suite_name,
    summarise,
    write_section,
)


def quick_setup(work: str):
    """A tiny corpus, tokenizer and model: checks the pipeline end to end, not the objectives."""
    from demo.corpus import make_demo_corpus
    from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer_from_texts

    data = os.path.join(work, "data")
    make_demo_corpus(
        data, num_train=24, num_dev=8, num_test=8, num_test_unseen_engine=4, seed=0, workers=2, progress=False
    )
    with open(os.path.join(REPO, "demo", "sentences.txt"), encoding="utf-8") as f:
        sentences = [s for s in f.read().splitlines() if s and not s.startswith("#")]
    tok = build_bpe_tokenizer_from_texts(sentences, os.path.join(work, "tok"), vocab_size=64)
    extra = [
        f"demo_dir={data}",
        f"model.tokenizer.dir={tok}",
        "model.encoder.n_layers=4",
        "model.encoder.d_model=32",
        "model.encoder.n_heads=2",
        "model.train_ds.batch_duration=12",
        "model.train_ds.num_workers=0",
        "trainer.max_steps=4",
        "trainer.limit_train_batches=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "model.log_prediction=false",
        "trainer.enable_progress_bar=false",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
    ]  # the config's between-validation saves
    runs = [r for r in RUNS if r.name in ("plain_ctc", "interctc")]
    return data, extra, [dataclasses.replace(r, seeds=(0,)) for r in runs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", help="comma-separated run names (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds for every selected run (default: each run's own)")
    p.add_argument("--work", help="experiment folders (default: artifacts/<benchmark name>)")
    p.add_argument(
        "--results", help="per-run result files (default: docs/results/<benchmark name>; --quick: <work>/results)"
    )
    p.add_argument(
        "--train-utterances",
        type=int,
        default=TRAIN_UTTERANCES,
        help="train on this many first utterances of the demo corpus (default: %(default)s)",
    )
    p.add_argument("--data", default=os.path.join(REPO, "demo_data"), help="the demo corpus folder")
    p.add_argument("--config", default="conformer_ctc_llm_ablation")
    p.add_argument("--summarise", action="store_true", help="don't train; rebuild the table and plots")
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only write the benchmark's training manifest and tokenizer under --work (for `make mlm`)",
    )
    p.add_argument("--quick", action="store_true", help="tiny corpus + model, 2 runs: checks the pipeline")
    p.add_argument("--force", action="store_true", help="redo runs that have a result file")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="don't train; score the finished runs' exported models again and rebuild the table",
    )
    p.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)

    # the same step budget for every run: the config's wall-clock cap would cut a slower run short
    runs, extra, data = list(RUNS), ["trainer.max_time=null", *args.override], args.data
    if args.train_utterances < 1:
        p.error(f"--train-utterances: must be a positive count, got {args.train_utterances}")
    name = suite_name(args.train_utterances)
    args.work = args.work or os.path.join(REPO, "artifacts", name)
    results = args.results or os.path.join(REPO, "docs", "results", name)
    report = os.path.join(REPO, "docs", "RESULTS.md")
    plots = os.path.join(REPO, "docs", "results")
    if args.quick:
        os.makedirs(args.work, exist_ok=True)
        data, quick_extra, runs = quick_setup(args.work)
        extra = quick_extra + extra
        results = args.results or os.path.join(args.work, "results")
        report, plots = os.path.join(args.work, "report.md"), os.path.join(args.work, "plots")
    elif not (args.summarise or args.rescore):
        extra = prepare_corpus(data, args.work, n=args.train_utterances) + extra
        if args.prepare:
            print("\n".join(extra))
            return
    if args.runs:
        known = {r.name: r for r in runs}
        unknown = [n for n in args.runs.split(",") if n not in known]
        if unknown:
            p.error(f"--runs: unknown run(s) {unknown}; known: {sorted(known)}")
        runs = [known[n] for n in args.runs.split(",")]
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        runs = [dataclasses.replace(r, seeds=seeds) for r in runs]

    if args.rescore:
        for run in runs:
            for seed in run.seeds:
                if os.path.isfile(result_path(results, run.name, seed)):
                    rescore(run, seed, work=args.work, results=results, data_dir=data)
    elif not args.summarise:
        todo = [(r, s) for r in runs for s in r.seeds]
        bar = tqdm(todo, desc="ablation", unit="run", file=sys.stdout)
        for run, seed in bar:
            bar.set_postfix_str(f"{run.name} s{seed}")
            if os.path.isfile(result_path(results, run.name, seed)) and not args.force:
                tqdm.write(f"{run.name} s{seed}: already finished ({result_path(results, run.name, seed)})")
                continue
            run_one(
                run,
                seed,
                work=args.work,
                results=results,
                data_dir=data,
                config=args.config,
                extra=extra,
                train_utterances=None if args.quick else args.train_utterances,
                log=tqdm.write,
            )
    table = summarise(
        results,
        plots,
        bench_json=os.path.join(REPO, "docs", "results", "bench_step.json"),
        order=[r.name for r in RUNS],
        reference_json=None if args.quick else os.path.join(REPO, "docs", "results", "whisper_base.json"),
        prefix=name,
    )
    rel = os.path.relpath(plots, os.path.dirname(report))
    size = "" if args.quick else f": {args.train_utterances:,} training utterances"
    # the dev-curve plot only where a run validated more than once: a curve of one point shows nothing
    curves = [r["dev_curve"] for rs in load_results(results).values() for r in rs]
    dev_plot = f"![dev WER]({rel}/{name}_dev_wer.png) " if any(len(c) > 1 for c in curves) else ""
    header = (
        f"### Ablation table{size} (generated by `benchmarks/ablate.py` from "
        f"`{os.path.relpath(results, REPO)}`)\n\n"
        f"{dev_plot}![test WER]({rel}/{name}_test_wer.png)\n"
    )
    write_section(report, table, header, name)
    print(table)


if __name__ == "__main__":
    main()
