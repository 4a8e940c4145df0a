"""The ablation benchmark behind ``benchmarks/ablate.py``: train the same encoder under each objective, score the
exported models, and summarise (table + plots) from small per-run result files.

One *run* = (name, seed): ``scripts/train.py`` on ``conf/conformer_ctc_llm_ablation.yaml`` plus the run's Hydra
overrides, in its own experiment folder (so a killed run resumes from its last checkpoint: the recipe sets
``exp_manager.resume_if_exists``), then export (no LLM, no regularizer heads) and greedy-CTC WER/CER on every
evaluation split. Its metrics go to ``<results>/<name>_s<seed>.json``; a run whose file exists is not redone,
so the table fills in over several sittings and is regenerated from those files alone.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = "model.llm.checkpoint=artifacts/llm/smollm2-135m"
PLAIN = ["model.objectives.interctc.enabled=false", "model.objectives.ctc_final.weight=1.0"]


@dataclass
class Run:
    name: str
    overrides: List[str]
    seeds: Sequence[int] = (0,)
    bench_variant: Optional[str] = None  # the benchmarks/bench_step.py variant that measures its step cost
    note: str = ""
    parts: Sequence["Run"] = ()  # a combination (see combine): the runs whose objectives it trains together

    @property
    def every(self) -> int:
        """The objective's every_n_steps (read from the overrides): its measured step-time ratio r costs
        1 + (r - 1) / every on average."""
        ks = [int(o.split("=", 1)[1]) for o in self.overrides if o.split("=", 1)[0].endswith(".every_n_steps")]
        return max(ks, default=1)

    @property
    def cost_parts(self) -> List[Tuple[str, int]]:
        """(benchmarks/bench_step.py variant, every_n_steps) of each objective the run adds to the control."""
        return [(r.bench_variant, r.every) for r in (self.parts or [self]) if r.bench_variant]


def combine(name: str, parts: Sequence[Run], seeds: Sequence[int] = (0, 1)) -> Run:
    """One run training the objectives of ``parts`` together, each with the settings of its own run."""
    overrides = list(dict.fromkeys(o for r in parts for o in r.overrides))  # the shared LLM path once
    return Run(
        name, overrides, seeds=seeds, parts=tuple(parts), note="combination: " + " + ".join(r.name for r in parts)
    )


def on(name: str, **keys) -> List[str]:
    """Overrides enabling the recipe's (documented, off) block ``model.objectives.<name>`` with these keys."""
    return [f"model.objectives.{name}.enabled=true"] + [f"model.objectives.{name}.{k}={v}" for k, v in keys.items()]


# The control is the ablation config itself (final CTC 0.7 + intermediate CTC at block 3, 0.3); every objective
# is added on top of it with its recipe block's defaults (conf/conformer_ctc_llm.yaml) plus the keys below.
RUNS: List[Run] = [
    Run("plain_ctc", PLAIN, seeds=(0, 1, 2), bench_variant="plain", note="NeMo's CTC alone"),
    Run("interctc", [], seeds=(0, 1, 2), bench_variant="interctc", note="control: CTC + intermediate CTC"),
    Run("interctc_selfcond", ["model.objectives.interctc.self_conditioning=true"], bench_variant="interctc_selfcond"),
    Run("joint_lm", on("joint_lm", weight=0.3), seeds=(0, 1), bench_variant="interctc_joint_lm"),
    Run("simclr", on("token_contrastive", mode="simclr", weight=0.1), bench_variant="interctc_simclr"),
    Run("byol", on("token_contrastive", mode="byol", weight=0.1), bench_variant="interctc_byol"),
    Run("clip", [SMOLLM2, *on("clip", weight=0.1)], bench_variant="interctc_clip"),
    # The LLM objectives cost 3-15x a plain step on 2 CPU cores (docs/RESULTS.md section 2); at the fixed step
    # budget they run every k-th step (every_n_steps) so that a run fits a sitting.
    Run(
        "llm_prefix_clm",
        [SMOLLM2, *on("llm_prefix_clm", weight=0.3, blocks="[3,6]", weights="[0.5,0.5]", stack=8, every_n_steps=8)],
        bench_variant="interctc_llm_prefix_clm",
    ),
    Run(
        "llm_rescoring",
        [SMOLLM2, *on("llm_rescoring", weight=0.5, nbest=4, every_n_steps=4)],
        bench_variant="llm_rescoring_n4",
    ),
    Run(
        "llm_reward",
        [SMOLLM2, *on("llm_reward", weight=0.05, num_samples=4, every_n_steps=8)],
        bench_variant="llm_reward_sample4",
    ),
    Run(
        "llm_pseudo_label",
        [SMOLLM2, *on("llm_pseudo_label", weight=0.3, nbest=8, every_n_steps=4)],
        bench_variant="llm_pseudo_label_n8",
    ),
    Run(
        "llm_lm_loss", [SMOLLM2, *on("llm_lm_loss", weight=0.1, every_n_steps=4)], bench_variant="interctc_llm_lm_loss"
    ),
    Run(
        "mlm",
        on("mlm", weight=0.1, model_dir="artifacts/mlm/bert-mlm-wordnet"),
        bench_variant="interctc_mlm",
        note="needs `make mlm`",
    ),
    # forward and backward through the LLM on the soft hypothesis, like llm_lm_loss: ~5x a plain step in this
    # benchmark's training (3.0 s vs 0.6 s, one thread; section 2's 1.67x is 8 utterances through an untrained
    # model), so every 4th step, like llm_lm_loss
    Run(
        "lang_contrastive",
        [SMOLLM2, *on("lang_contrastive", weight=0.1, every_n_steps=4)],
        seeds=(0, 1),
        bench_variant="interctc_lang_contrastive",
    ),
]
# The best combination: the two objectives with the lowest test WER once 14 of the 16 single runs were in
# (lang_contrastive 73.2, llm_reward 73.3 vs the control's 74.2 ± 0.1), chosen before llm_rescoring and
# llm_pseudo_label had finished; two seeds, like the controls.
_SINGLE = {r.name: r for r in RUNS}
RUNS.append(combine("combo_reward_lang_contrastive", [_SINGLE["llm_reward"], _SINGLE["lang_contrastive"]]))
# On 10,000 utterances (--train-utterances 10000) the two single objectives with the lowest test WER after their
# first seed were clip (66.1) and llm_prefix_clm (66.1, 67.1 with its second seed) vs the control's 66.6 ± 0.6.
RUNS.append(combine("combo_prefix_clm_clip", [_SINGLE["llm_prefix_clm"], _SINGLE["clip"]]))


def variant(base: str, suffix: str, note: str, seeds: Sequence[int] = (0,), **keys) -> Run:
    """``base`` with some of its objective's keys changed (what was tried to make it work): same step cost."""
    run = _SINGLE[base]
    block = next(o.split(".")[2] for o in run.overrides if o.endswith(".enabled=true"))
    changed = {f"model.objectives.{block}.{k}": v for k, v in keys.items()}
    kept = [o for o in run.overrides if o.split("=", 1)[0] not in changed]
    return Run(
        f"{base}_{suffix}",
        kept + [f"{k}={v}" for k, v in changed.items()],
        seeds=seeds,
        bench_variant=run.bench_variant,
        note=f"tuning {base}: {note}",
    )


# Tuning: the objectives closest to the control, with a larger weight, a warm-up or another layer. joint_lm at
# weight 1.0 was the one beyond the noise floor after its first seed, so it got a second.
RUNS += [
    variant("llm_reward", "w0.2", "weight 0.05 -> 0.2", weight=0.2),
    variant(
        "lang_contrastive", "head3", "on the intermediate CTC head (block 3) instead of the final one", head_block=3
    ),
    variant(
        "joint_lm",
        "w1_warm300",
        "weight 0.3 -> 1.0, ramped in over the first 300 steps",
        seeds=(0, 1),
        weight=1.0,
        warmup_steps=300,
    ),
]

EVAL_SPLITS = {
    "dev": "dev_manifest.json",
    "test": "test_manifest.json",
    "test_unseen_engine": "test_unseen_engine_manifest.json",
}

# The benchmark trains on the first 3,000 training utterances of the demo corpus (the demo itself grew to 10,000
# later). The corpus plan is prefix-stable (utterance i of a split depends only on seed, split and i), so these
# are the very utterances the benchmark's runs were made on, and dev/test are the demo's own.
TRAIN_UTTERANCES = 3000
VOCAB_SIZE = 128


def suite_name(n: int = TRAIN_UTTERANCES) -> str:
    """The name of the benchmark on the first ``n`` training utterances: its work folder, its result folder
    (docs/results/<name>), its plots' prefix and its section markers in docs/RESULTS.md. The 3,000-utterance
    benchmark keeps the plain name its files were made under."""
    return "ablation" if n == TRAIN_UTTERANCES else f"ablation_{n}"


def prepare_corpus(data_dir: str, work: str, n: int = TRAIN_UTTERANCES, vocab_size: int = VOCAB_SIZE) -> List[str]:
    """Write the benchmark's training manifest (the first ``n`` lines of the demo corpus's) and its BPE tokenizer
    trained on them under ``work``; returns the Hydra overrides that point a run at them."""
    from nemo_ctcllm.data.tokenizer import build_bpe_tokenizer_from_texts

    params_path = os.path.join(data_dir, "params.json")
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"{params_path}: no demo corpus here; make it with `make demo-data`")
    params = json.load(open(params_path))
    have = params["sizes"]["train"]
    if params["seed"] != 0 or have < n:
        raise ValueError(
            f"{params_path}: the benchmark needs the seed-0 demo corpus with at least {n} training "
            f"utterances (this one: seed {params['seed']}, {have})"
        )
    with open(os.path.join(data_dir, "train_manifest.json"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    os.makedirs(work, exist_ok=True)
    manifest = os.path.join(work, f"train_manifest_{n}.json")
    with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(lines)
    tokenizer = build_bpe_tokenizer_from_texts([json.loads(line)["text"] for line in lines], work, vocab_size)
    return [f"demo_dir={data_dir}", f"model.train_ds.manifest_filepath={manifest}", f"model.tokenizer.dir={tokenizer}"]


def sitting_id() -> Optional[str]:
    """This machine's boot id, shortened: runs made in one sitting share it. Step times logged in training are
    only comparable within a sitting (the machines of different sittings differed up to 2x in speed)."""
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()[:8]
    except OSError:
        return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        # results and reports (docs/) being rewritten by other runs don't make the code dirty
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def result_path(results: str, run: str, seed: int) -> str:
    return os.path.join(results, f"{run}_s{seed}.json")


def train_command(run: Run, seed: int, work: str, config: str, extra: Sequence[str]) -> List[str]:
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        f"--config-name={config}",
        f"seed={seed}",
        f"exp_manager.exp_dir={os.path.join(work, f'{run.name}_s{seed}')}",
        f"name={run.name}",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
        *extra,
        *run.overrides,
    ]


def _scalars(exp_dir: str, tag: str) -> Dict[int, float]:
    """{step: value} of one TensorBoard scalar over all the run's event files (a resumed run has several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: Dict[int, float] = {}
    for events in sorted(glob.glob(os.path.join(exp_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def dev_curve(exp_dir: str, tag: str = "val_wer") -> List[List[float]]:
    """[[step, dev WER], ...] (or another validation scalar) from the run's TensorBoard events."""
    curve = _scalars(exp_dir, tag)
    return [[s, curve[s]] for s in sorted(curve)]


def train_step_seconds(exp_dir: str) -> Optional[float]:
    """Mean wall time of the training steps Lightning logged (every log_every_n_steps-th step, so an objective
    that runs every k-th step is in about 1/k of them): the run's own, rough, cost measurement."""
    times = _scalars(exp_dir, "train_step_timing in s")
    return round(statistics.mean(times.values()), 4) if times else None


def score_export(infer: str, data_dir: str, label: str, log=print) -> dict:
    """Greedy-CTC WER/CER (with the per-engine breakdown) of an exported model on every evaluation split."""
    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401
    from nemo_ctcllm.evaluate import evaluate

    model = ASRModel.restore_from(infer, map_location="cpu")
    metrics = {}
    for split, manifest in EVAL_SPLITS.items():
        path = os.path.join(data_dir, manifest)
        if os.path.isfile(path):
            metrics[split] = evaluate(model, path)
            log(f"  {label} {split}: WER {100 * metrics[split]['wer']:.1f} CER {100 * metrics[split]['cer']:.1f}")
    return {
        "metrics": metrics,
        "exported_params": sum(p.numel() for p in model.parameters()),
        "exported_nemo_bytes": os.path.getsize(infer),
    }


def portable_command(cmd: Sequence[str], work: str, script: str = "scripts/train.py") -> str:
    """The command ([python, script, *args]) as a result file records it: paths relative to the repository, the
    work folder as ``<work>`` when it lies outside it, so that no file names a machine's folders."""
    text = " ".join(["python", script, *cmd[2:]])
    work = os.path.abspath(work)
    outside = os.path.relpath(work, REPO).startswith("..")
    text = text.replace(work + os.sep, "<work>/" if outside else os.path.relpath(work, REPO) + os.sep)
    return text.replace(REPO + os.sep, "")


def run_one(
    run: Run,
    seed: int,
    *,
    work: str,
    results: str,
    data_dir: str,
    config: str,
    extra: Sequence[str],
    train_utterances: Optional[int] = None,
    log=print,
) -> dict:
    """Train (or resume) one run, export it, score it, write its result file; returns the result."""
    from nemo_ctcllm.export import export_for_inference

    exp_dir = os.path.join(work, f"{run.name}_s{seed}")
    os.makedirs(exp_dir, exist_ok=True)
    cmd = train_command(run, seed, work, config, extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    commit = git_commit()  # the code that trains, not what the checkout holds when the run ends
    start = time.time()
    with open(os.path.join(exp_dir, "train.log"), "a") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.name} seed {seed} failed (exit {proc.returncode}); see {exp_dir}/train.log")
    nemo = sorted(glob.glob(os.path.join(exp_dir, run.name, "checkpoints", f"{run.name}.nemo")))
    if not nemo:
        raise RuntimeError(f"run {run.name} seed {seed}: no .nemo under {exp_dir}")
    infer = os.path.join(exp_dir, "inference.nemo")
    export_for_inference(nemo[0], infer)
    scored = score_export(infer, data_dir, f"{run.name} s{seed}", log)
    curve = dev_curve(exp_dir)
    result = {
        "run": run.name,
        "seed": seed,
        "overrides": run.overrides,
        "note": run.note,
        "command": portable_command(cmd, work),
        "commit": commit,
        "sitting": sitting_id(),
        "wall_s_last_sitting": round(wall, 1),
        "steps": int(curve[-1][0]) if curve else None,
        "dev_curve": curve,
        **scored,
        "train_step_s_mean": train_step_seconds(exp_dir),
        "bench_variant": run.bench_variant,
        "every_n_steps": run.every,
        "cost_parts": run.cost_parts,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "train_utterances": train_utterances,
    }
    os.makedirs(results, exist_ok=True)
    with open(result_path(results, run.name, seed), "w") as f:
        json.dump(result, f, indent=1)
    return result


def rescore(run: Run, seed: int, *, work: str, results: str, data_dir: str, log=print) -> dict:
    """Score a finished run's exported model again (e.g. after the scorer changed); training fields are kept."""
    path = result_path(results, run.name, seed)
    infer = os.path.join(work, f"{run.name}_s{seed}", "inference.nemo")
    if not os.path.isfile(infer):
        raise FileNotFoundError(f"run {run.name} seed {seed}: {infer} is not here to score again")
    result = {**json.load(open(path)), **score_export(infer, data_dir, f"{run.name} s{seed}", log)}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


# ------------------------------------------------------------------ summary
def load_results(results: str) -> Dict[str, List[dict]]:
    by_run: Dict[str, List[dict]] = {}
    for path in sorted(glob.glob(os.path.join(results, "*_s*.json"))):
        r = json.load(open(path))
        by_run.setdefault(r["run"], []).append(r)
    return by_run


def _mean_spread(values: List[float]):
    return statistics.mean(values), (max(values) - min(values)) if len(values) > 1 else None


def _cost_cells(result: dict, bench: dict) -> Tuple[str, str]:
    """Step time and peak memory × plain CTC from the section-2 measurements of the run's objective(s). An
    objective measured at r that runs every k-th step costs 1 + (r - 1) / k on average; a combination adds its
    parts' extra costs, and its peak memory is at least its largest part's."""
    parts = result.get("cost_parts")
    if parts is None:  # result files written before cost_parts existed: one objective
        parts = [[result["bench_variant"], result.get("every_n_steps", 1)]] if result.get("bench_variant") else []
    measured = [(bench[v], k) for v, k in parts if "ratio" in bench.get(v, {})]
    if not parts or len(measured) < len(parts):
        return "—", "—"
    cost = 1 + sum((b["ratio"] - 1) / k for b, k in measured)
    peak = max(b["peak_ratio"] for b, _ in measured)
    if len(measured) > 1:
        return f"{cost:.2f} (sum of its parts)", f"≥ {peak:.2f}"
    ((b, k),) = measured
    return (f"{cost:.2f} ({b['ratio']:.2f} every {k} steps)" if k > 1 else f"{b['ratio']:.2f}"), f"{peak:.2f}"


def summarise(
    results: str,
    plots_dir: str,
    bench_json: Optional[str] = None,
    order: Sequence[str] = (),
    reference_json: Optional[str] = None,
    prefix: str = "ablation",
) -> str:
    """The ablation table (markdown) and two PNG plots (<prefix>_dev_wer.png, <prefix>_test_wer.png), from the
    per-run files only; ``reference_json`` (the benchmarks/whisper_reference.py summary) adds the external
    yardstick as the last row."""
    by_run = load_results(results)
    if not by_run:
        return "_no finished runs yet_\n"
    names = [n for n in order if n in by_run] + sorted(set(by_run) - set(order))
    bench = {}
    if bench_json and os.path.isfile(bench_json):
        bench = json.load(open(bench_json)).get("results", {})
    test_of = {n: [100 * r["metrics"]["test"]["wer"] for r in by_run[n] if "test" in r["metrics"]] for n in names}

    # The benchmark's noise floor: the largest min-max spread of test WER over seeds in any run. With two seeds
    # per run a single run's spread underestimates the noise; a change smaller than this floor is no difference.
    spreads = [_mean_spread(v)[1] for v in test_of.values() if len(v) > 1]
    floor = max(spreads) if spreads else None

    def rel(n: str, ref: str) -> str:
        if ref not in test_of or not test_of[ref] or not test_of[n] or n == ref:
            return "—"
        m, mr = _mean_spread(test_of[n])[0], _mean_spread(test_of[ref])[0]
        change = 100 * (m - mr) / mr
        if floor is not None and abs(m - mr) <= floor:
            return f"{change:+.1f} % (within seed spread: no difference)"
        return f"{change:+.1f} %"

    def in_run(rs: List[dict]):  # mean logged training step time of the one-thread runs
        secs = [r["train_step_s_mean"] for r in rs if r.get("train_step_s_mean") and r.get("omp_num_threads") == "1"]
        return statistics.mean(secs) if secs else None

    def in_run_ratio(rs: List[dict]):
        """Mean over the run's seeds of its logged step time over plain CTC's of the same sitting; files from
        before sittings were recorded are compared with the plain runs of those earlier sittings, as one pool."""
        plain = by_run.get("plain_ctc", [])
        ratios = []
        for r in rs:
            secs, ref = in_run([r]), in_run([p for p in plain if p.get("sitting") == r.get("sitting")])
            if secs and ref:
                ratios.append(secs / ref)
        return statistics.mean(ratios) if ratios else None

    def scores(rs: List[dict]) -> str:
        """The dev, test, test CER, test espeak-ng and unseen-engine cells of one run (mean ± half spread)."""

        def cell(split, key="wer", engine=None):
            found = [r["metrics"][split] for r in rs if split in r["metrics"]]
            if engine:
                found = [s["by_engine"][engine] for s in found if engine in s.get("by_engine", {})]
            if not found:
                return "—"
            m, spread = _mean_spread([100 * s[key] for s in found])
            return f"{m:.1f}" + (f" ± {spread / 2:.1f}" if spread is not None else "")

        return (
            f"{cell('dev')} | {cell('test')} | {cell('test', 'cer')} | {cell('test', engine='espeak-ng')} | "
            f"{cell('test_unseen_engine')}"
        )

    lines = [
        "| run | seeds | dev WER | test WER | test CER | test WER, espeak-ng voices | unseen-engine WER | "
        "vs plain CTC (test) | vs interctc control (test) | step time × plain | peak memory × plain | "
        "step time × plain, in training | last val step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = by_run[n]
        ratio, mem = _cost_cells(rs[0], bench)
        ratio_in_run = in_run_ratio(rs)
        trained = f"{ratio_in_run:.2f}" if ratio_in_run else "—"
        lines.append(
            f"| {n} | {','.join(str(r['seed']) for r in rs)} | {scores(rs)} | {rel(n, 'plain_ctc')} | "
            f"{rel(n, 'interctc')} | {ratio} | {mem} | {trained} | {max((r['steps'] or 0) for r in rs)} |"
        )
    if reference_json and os.path.isfile(reference_json):  # the external yardstick, scored the same way
        ref = json.load(open(reference_json))
        name = f"{ref['model_id'].split()[0]}, beam {ref['decoding']['beam_size']}"
        lines.append(f"| *reference: {name}* | — | {scores([{'metrics': ref['splits']}])} | — | — | — | — | — | — |")
    lines.append("")
    lines.append(
        "WER/CER in %, greedy CTC, exported model (no LLM), text normalised by nemo_ctcllm.evaluate (the "
        "reference row: the same scorer on Whisper's output). "
        "± is half the min–max spread over seeds; a change of test WER smaller than the largest min–max spread "
        "over seeds of any run (the noise floor: "
        + (f"{floor:.1f} points" if floor is not None else "n/a")
        + ") is reported as no difference. "
        "Step time and peak memory: benchmarks/bench_step.py (same batch, same process); an objective that "
        'runs every k steps costs 1 + (r - 1) / k of its measured ratio r on average. "In training": the '
        "mean step time Lightning logged during the run (every 25th step here; one thread, beside another "
        "run, so rough) over plain CTC's in the same sitting (machine boot; files without one: over the "
        "plain runs of the sittings before it was recorded), averaged over seeds; runs with another thread "
        "count are left out of it. Commits and exact commands are in each run's file."
    )
    lines += ["", *_paired_vs_control(by_run, names)]
    _plots(by_run, names, plots_dir, floor, prefix)
    return "\n".join(lines) + "\n"


def _paired_vs_control(by_run: Dict[str, List[dict]], names: Sequence[str]) -> List[str]:
    """Test WER minus the control's, seed by seed. A seed fixes the initialisation and the data order of every
    run, and its own effect is shared (a seed that trains badly does so for all runs), so per-seed differences
    vary less than the runs' means; an effect shows as differences of one sign on every shared seed."""
    control = {
        r["seed"]: 100 * r["metrics"]["test"]["wer"] for r in by_run.get("interctc", []) if "test" in r["metrics"]
    }
    rows = []
    for n in names:
        diffs = {
            r["seed"]: 100 * r["metrics"]["test"]["wer"] - control[r["seed"]]
            for r in by_run[n]
            if r["seed"] in control and "test" in r["metrics"]
        }
        if n == "interctc" or not diffs:
            continue
        d = [diffs[k] for k in sorted(diffs)]
        verdict = "lower on every seed" if max(d) < 0 else "higher on every seed" if min(d) > 0 else "mixed"
        verdict = verdict if len(d) > 1 else "one seed"
        rows.append(
            f"| {n} | {', '.join(f's{k} {diffs[k]:+.1f}' for k in sorted(diffs))} | "
            f"{statistics.mean(d):+.1f} | {verdict} |"
        )
    if not rows:
        return []
    return [
        "Test WER minus the control's, seed by seed (same seed: same initialisation and data order, so the "
        "seed's own effect cancels). Without any effect, one sign on all of n seeds still happens by chance "
        "with probability 2^(1-n): 1/2 for two seeds, 1/4 for three.",
        "",
        "| run | per seed (points) | mean | sign |",
        "|---|---|---|---|",
        *rows,
    ]


def _plots(
    by_run: Dict[str, List[dict]], names: Sequence[str], plots_dir: str, floor: Optional[float], prefix: str
) -> None:
    """<prefix>_dev_wer.png: one panel per run, its dev curve(s) over the intermediate-CTC control's seed band
    (grey) and plain CTC (dashed). <prefix>_test_wer.png: every seed's final WER per run and split, with the
    control's mean and, on test, the noise floor around it (a run whose mean lies there is no different) and
    the goal (10 % relative below the control)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plots_dir, exist_ok=True)

    def band(run: str):  # per validation (the i-th of each seed: their steps differ by a few): step, min, max
        curves = [r["dev_curve"] for r in by_run.get(run, []) if r["dev_curve"]]
        points = list(zip(*curves))  # [((step, wer) of each seed) for the i-th validation]
        return (
            [statistics.mean(s for s, _ in p) for p in points],
            [100 * min(w for _, w in p) for p in points],
            [100 * max(w for _, w in p) for p in points],
        )

    panels = [n for n in names if n not in ("interctc", "plain_ctc")] or list(names)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
    control, plain = band("interctc"), band("plain_ctc")
    for ax, n in zip(axes.flat, panels):
        if control[0]:
            ax.fill_between(control[0], control[1], control[2], color="0.6", alpha=0.5, lw=0, label="interctc control")
        if plain[0]:
            ax.plot(plain[0], [(a + b) / 2 for a, b in zip(plain[1], plain[2])], "k--", lw=1, label="plain CTC")
        for r in by_run[n]:
            if r["dev_curve"]:
                steps, wers = zip(*r["dev_curve"])
                ax.plot(steps, [100 * w for w in wers], marker="o", ms=2.5, lw=1.2, label=f"seed {r['seed']}")
        ax.set_title(n, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("optimizer step", fontsize=9)
    fig.supylabel("dev WER (%)", fontsize=9)
    fig.suptitle(
        "Dev WER during training: each run against the intermediate-CTC control (grey: its seeds' range)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(os.path.join(plots_dir, f"{prefix}_dev_wer.png"), dpi=110)
    plt.close(fig)

    splits = (("dev", "dev"), ("test", "test (unseen voices)"), ("test_unseen_engine", "unseen engine"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.32 * len(names) + 1.6), sharey=True)
    ys = range(len(names))
    for ax, (split, title) in zip(axes, splits):
        ctrl = [100 * r["metrics"][split]["wer"] for r in by_run.get("interctc", []) if split in r["metrics"]]
        if ctrl:
            m = statistics.mean(ctrl)
            ax.axvline(m, color="0.4", lw=1, label="control mean")
            if split == "test":  # the floor is measured on test WER, and so is the goal
                ax.axvspan(
                    m - (floor or 0), m + (floor or 0), color="0.85", lw=0, label="± noise floor (no difference)"
                )
                ax.axvline(0.9 * m, color="tab:red", ls=":", lw=1.2, label="goal: −10 % vs control")
        for y, n in zip(ys, names):
            vals = [100 * r["metrics"][split]["wer"] for r in by_run[n] if split in r["metrics"]]
            ax.plot(vals, [y] * len(vals), "o", ms=4, color="tab:blue", alpha=0.8)
            if len(vals) > 1:
                ax.plot([statistics.mean(vals)], [y], "|", ms=10, mew=2, color="k")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("WER (%)", fontsize=8)
        if split == "test":
            ax.legend(fontsize=6, loc="upper left")
    axes[0].set_yticks(list(ys), names)
    axes[0].invert_yaxis()
    fig.suptitle("Final WER of the exported model (dots: seeds, bar: their mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(plots_dir, f"{prefix}_test_wer.png"), dpi=110)
    plt.close(fig)


def write_section(report: str, table: str, header: str, name: str = "ablation") -> None:
    """Replace the text between the ``name`` markers of ``report`` (or append them and it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{header}\n{table}{end}"
    text = open(report).read() if os.path.isfile(report) else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    with open(report, "w") as f:
        f.write(text)
