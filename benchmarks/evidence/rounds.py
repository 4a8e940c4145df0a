#!/usr/bin/env python
"""Iterative pseudo-labelling at scale (issue 31), in the evidence benchmark's domain and from its base.

    python -m benchmarks.evidence.rounds label --work W --kinds greedy,llm --rounds 1 --seeds 0,1,2
    python -m benchmarks.evidence.rounds train --work W --arms control,st_greedy,st_llm --rounds 1 --seeds 0,1,2
    python -m benchmarks.evidence.rounds test  --work W --arms control,st_greedy,st_llm --rounds 2 --seeds 0,1,2
    python -m benchmarks.evidence.rounds report --work W   # tables and plots -> docs/RESULTS.md section 12

``W`` is the evidence benchmark's work folder after its ``base`` and ``domain`` stages. The unlabelled pool is all
of the domain's unlabelled audio (5,000 utterances, 10x the 500 labelled). Round r labels the whole pool with
``scripts/pseudo_label.py``'s library: round 1 with the base (the same labels for every seed), round r > 1 with the
same arm and seed's round r-1 model; ``st_greedy`` keeps the teacher's greedy transcripts, ``st_llm`` its 8-best
ranked by a + 0.5·log p_SmolLM2 (the reference row's decoder). Every round fine-tunes *from the base* on the
labelled set plus the labelled pool, for STEPS steps (about two passes over the pool); ``control`` fine-tunes on the
labelled set alone for the same steps. Everything resumes: labelling by blocks, training from its last checkpoint,
a finished result is skipped. Test is scored once per final configuration (``test`` on the last round).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from benchmarks.evidence.run import (
    ARMS,
    REPO,
    RESCORE,
    Arm,
    Paths,
    _read_json,
    _write_json,
    arm_stage,
    test_stage,
)

RESULTS_DEFAULT = "evidence_pl"
# Fine-tuning of every round and of the control: the section-11 recipe (lr chosen on dev there) but STEPS steps.
# Pool + labelled set ~ 2.9 h; a pseudo-label step takes 48 s batches (about 33 s of audio once bucketed, measured
# in section 11), so 640 steps ~ 2 passes over the pool.
STEPS = 640
FINETUNE_PL = {"steps": STEPS, "lr": 3e-4, "warmup": 20, "batch_duration": 24}
KINDS = {"st_greedy": "greedy", "st_llm": "llm"}  # arm -> its labelling


class RoundPaths(Paths):
    """The evidence benchmark's paths, with this benchmark's own experiments, labels and result files."""

    def __init__(self, work: str, results: str):
        super().__init__(work, results)
        converged = os.path.join(REPO, "docs", "results", "evidence_converged")  # the base's and domain's records
        self.base_json, self.domain_json = os.path.join(converged, "base.json"), os.path.join(converged, "domain.json")
        self.rounds = os.path.join(self.work, "pl_rounds")
        self.pool = self.manifest("unlabelled")

    def arm_exp(self, arm: str, seed: int) -> str:
        return os.path.join(self.rounds, "arms", f"{arm}_s{seed}")

    def labels(self, kind: str, rnd: int, seed: int) -> str:
        """The label folder of round ``rnd`` (round 1: the base's, shared by every seed)."""
        return os.path.join(self.rounds, "labels", f"{kind}_r1" if rnd == 1 else f"{kind}_r{rnd}_s{seed}")

    def pl_manifest(self, data: str) -> str:  # data: "<kind>_r<round>_s<seed>"
        kind, rnd, seed = data.rsplit("_", 2)
        return os.path.join(self.labels(kind, int(rnd[1:]), int(seed[1:])), "pseudo_labels.json")


def round_arm(arm: str, rnd: int, seed: int) -> Arm:
    if arm == "control":
        return ARMS["control"]
    return Arm(f"{arm}_r{rnd}", [], data=f"{KINDS[arm]}_r{rnd}_s{seed}", note=f"{arm}, round {rnd}")


def teacher(p: RoundPaths, arm: str, rnd: int, seed: int) -> str:
    if rnd == 1:
        return p.base_nemo
    path = os.path.join(p.arm_exp(f"{arm}_r{rnd - 1}", seed), "inference.nemo")
    if not os.path.isfile(path):
        raise RuntimeError(f"round {rnd} of {arm} s{seed} needs round {rnd - 1}'s model: train it first ({path})")
    return path


def label_stage(p: RoundPaths, arm: str, rnd: int, seed: int, llm: str, log=print) -> dict:
    """Label the whole pool for (arm, round, seed); writes <results>/labels_<kind>_r<round>[_s<seed>].json with the
    labels' WER against the sentences the audio speaks (held out of every manifest: measured here only)."""
    from nemo_ctcllm import pseudo_label as pl
    from nemo_ctcllm.evaluate import normalize_text
    from nemo_ctcllm.llm import LLMHost

    kind = KINDS[arm]
    tag = f"{kind}_r1" if rnd == 1 else f"{kind}_r{rnd}_s{seed}"
    out = os.path.join(p.results, f"labels_{tag}.json")
    if os.path.isfile(out):
        return _read_json(out)
    folder = p.labels(kind, rnd, seed)
    model_path = teacher(p, arm, rnd, seed)
    settings = pl.LabelSettings(nbest=RESCORE["nbest"], llm_weight=RESCORE["llm_weight"])
    model = pl.load_teacher(model_path)
    host = LLMHost(llm, tp_size=1) if kind == "llm" else None
    run = pl.label_shard(model, [p.pool], folder, settings, host, teacher_id=pl.file_digest(model_path), log=log)
    summary = pl.finalize([p.pool], folder, run=run)
    rows = [
        {**r, "confidence": pl.confidence(r)} for r in pl.collect(folder, summary["utterances"], settings.block_size, 1)
    ]
    truth = _read_json(os.path.join(p.domain, "sentences.json"))["unlabelled"]
    from nemo.collections.asr.metrics.wer import word_error_rate

    refs = [normalize_text(t) for t in truth]
    hyps = [normalize_text(r["label"]) for r in rows]
    result = {
        "kind": kind,
        "round": rnd,
        "seed": None if rnd == 1 else seed,
        "teacher": os.path.relpath(model_path, p.work),
        "utterances": summary["utterances"],
        "kept": summary["kept"],
        "label_wer": round(word_error_rate(hyps, refs), 4),
        "mean_confidence": summary["mean_confidence"],
        "calibration": pl.calibration(rows, refs),
        "settings": {k: summary["settings"][k] for k in ("nbest", "llm_weight")},
        "seconds_this_run": run["seconds"],
        "utt_per_s_this_run": round(run["labelled"] / run["seconds"], 3) if run["seconds"] else None,
    }
    log(f"labels {tag}: WER {100 * result['label_wer']:.2f} %, {run['seconds']:.0f} s")
    _write_json(out, result)
    return result


def train_stage(p: RoundPaths, arm: str, rnd: int, seed: int, llm: str, threads: Optional[int], log=print) -> dict:
    if arm != "control":
        label_stage(p, arm, rnd, seed, llm, log)
    return arm_stage(p, round_arm(arm, rnd, seed), seed, FINETUNE_PL, llm, threads=threads, log=log)


def labels_table(results_dir: str) -> str:
    """Every labelling of the pool: its teacher, the labels' WER against the sentences the audio speaks, time."""
    import glob

    rows = [_read_json(f) for f in sorted(glob.glob(os.path.join(results_dir, "labels_*.json")))]
    lines = [
        "| labels | round | seed | teacher | utterances | label WER % | mean confidence (T = 1) | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["round"], r["kind"], r["seed"] or 0)):
        lines.append(
            f"| {r['kind']} | {r['round']} | {'all' if r['seed'] is None else r['seed']} | `{r['teacher']}` |"
            f" {r['utterances']:,} | {100 * r['label_wer']:.2f} | {r['mean_confidence']:.3f} |"
            f" {r['seconds_this_run'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def passes_line(results) -> str:
    """Validations run once per pass over the training manifest: how many passes each arm made."""
    out = []
    for arm in sorted(results):
        counts = sorted({len(r["dev_curve"]) for r in results[arm].values()})
        out.append(f"`{arm}` {'/'.join(map(str, counts))}")
    return "Passes over the training manifest (validations, one per pass): " + ", ".join(out) + "."


def report(p: RoundPaths, report_path: str, plot_dir: str, name: str = RESULTS_DEFAULT) -> str:
    from benchmarks.ablation import write_section
    from benchmarks.evidence.report import dev_table, load_results, plots, test_table, versus_table

    results = load_results(p.results)
    if "control" not in results:
        raise RuntimeError(f"no control result under {p.results}: run the train stage for 'control' first")
    rel = os.path.relpath(plot_dir, os.path.dirname(os.path.abspath(report_path)))
    written = plots(results, plot_dir, prefix=name)
    pairs = [(f"st_llm_r{r}", f"st_greedy_r{r}") for r in (1, 2, 3)]
    text = [
        "**Labels of the pool** (5,000 utterances; WER against the sentences the audio speaks, which no manifest"
        " holds):",
        "",
        labels_table(p.results),
        "**Dev** (paired with the control by seed; one configuration per arm, none tuned here):",
        "",
        dev_table(results),
        passes_line(results),
        "",
    ]
    if any("test_seen" in r["metrics"] for runs in results.values() for r in runs.values()):
        text += ["**Test** (scored once per final configuration):", "", test_table(results)]
    text += ["**LLM-ranked vs greedy labels**, paired by seed:", "", versus_table(results, pairs)]
    text += [" ".join(f"![{os.path.basename(w)}]({rel}/{os.path.basename(w)})" for w in written), ""]
    body = "\n".join(text)
    header = "### Pseudo-label rounds tables (generated by `benchmarks/evidence/rounds.py report`)\n"
    write_section(report_path, body, header, name)
    return body


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["label", "train", "test", "report"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--results", default=os.path.join(REPO, "docs", "results", RESULTS_DEFAULT))
    ap.add_argument("--arms", default="control,st_greedy,st_llm")
    ap.add_argument("--rounds", default="1", help="comma-separated rounds, run in order")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--llm", default=os.path.join(REPO, "artifacts", "llm", "smollm2-135m"))
    ap.add_argument("--rescore", action="store_true", help="test, control: also the LLM-rescored reference row")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    p = RoundPaths(args.work, args.results)
    if args.stage == "report":
        docs = os.path.join(REPO, "docs")
        name = os.path.basename(os.path.normpath(p.results))
        print(report(p, os.path.join(docs, "RESULTS.md"), os.path.join(docs, "results"), name))
        return
    arms = args.arms.split(",")
    unknown = [a for a in arms if a != "control" and a not in KINDS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; known: control, {', '.join(KINDS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rounds: List[int] = [int(r) for r in args.rounds.split(",")]
    start = time.time()
    for rnd in rounds:
        for seed in seeds:
            for arm in arms:
                if arm == "control" and rnd != rounds[0]:
                    continue  # the control has no rounds
                if args.stage == "label":
                    if arm != "control":
                        label_stage(p, arm, rnd, seed, args.llm)
                elif args.stage == "train":
                    train_stage(p, arm, rnd, seed, args.llm, args.threads)
                else:
                    name = arm if arm == "control" else f"{arm}_r{rnd}"
                    test_stage(p, name, seed, args.llm if (args.rescore and arm == "control") else None)
    print(json.dumps({"stage": args.stage, "minutes": round((time.time() - start) / 60, 1)}), file=sys.stderr)


if __name__ == "__main__":
    main()
