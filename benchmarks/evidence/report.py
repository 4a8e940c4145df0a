"""The evidence benchmark's report: tables and plots made from its result files alone (the ``report`` stage of
``benchmarks/evidence/run.py``; ``benchmarks/evidence/rounds.py`` reuses the tables). Nothing here trains or
scores: every number is read back from ``<results>/*.json``."""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence

from benchmarks.ablation import write_section
from benchmarks.evidence.run import RESCORE, Arm, Paths, _read_json

VERSUS = ("pl_llm", "pl_greedy")  # the semi-supervised question: do the LLM's labels beat the model's own?


def load_results(results: str) -> Dict[str, Dict[int, dict]]:
    """{arm: {seed: result}} of every arm result file under ``results`` (other records there, e.g. a labelling's,
    are not arms)."""
    out: Dict[str, Dict[int, dict]] = {}
    for path in sorted(glob.glob(os.path.join(results, "*_s*.json"))):
        r = _read_json(path)
        if "arm" in r:
            out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def _scored(runs: Dict[int, dict], split: str, key: Optional[str] = None) -> Dict[int, dict]:
    """{seed: metrics} of the runs scored on ``split`` (``key="llm_rescored"``: those of the rescored decoding)."""
    out = {}
    for seed, r in runs.items():
        m = r["metrics"].get(split)
        if m is not None and (key is None or key in m):
            out[seed] = m[key] if key else m
    return out


def _wers(runs: Dict[int, dict], split: str, key: Optional[str] = None) -> Dict[int, float]:
    """{seed: WER in %} of the runs scored on ``split``."""
    return {seed: 100 * m["wer"] for seed, m in _scored(runs, split, key).items()}


def _recall(runs: Dict[int, dict], split: str, key: Optional[str] = None, group: str = "unseen") -> Optional[float]:
    """Mean recall (%) over seeds of the ``group`` (unseen | seen) words."""
    vals = [m["word_recall"][group]["recall"] for m in _scored(runs, split, key).values()]
    vals = [v for v in vals if v is not None]
    return 100 * sum(vals) / len(vals) if vals else None


def _cost_ratio(control: Dict[int, dict], runs: Dict[int, dict]) -> Optional[float]:
    """Mean over common seeds of the arm's mean logged step time over the control's (same sitting only)."""
    ratios = [
        runs[s]["train_step_s_mean"] / control[s]["train_step_s_mean"]
        for s in set(control) & set(runs)
        if runs[s].get("train_step_s_mean")
        and control[s].get("train_step_s_mean")
        and runs[s].get("sitting") == control[s].get("sitting")
    ]
    return sum(ratios) / len(ratios) if ratios else None


def dev_table(results: Dict[str, Dict[int, dict]]) -> str:
    """Every arm on dev, paired against the control: where every choice is made."""
    from benchmarks.evidence.stats import paired_summary

    control = _wers(results["control"], "dev")
    lines = [
        "| arm | seeds | dev WER % | vs control (points), 95 % CI | relative, 95 % CI | step cost × control |",
        "|---|---|---|---|---|---|",
        f"| control | {len(control)} | {sum(control.values()) / len(control):.2f} | — | — | 1.00 |",
    ]
    for arm in sorted(a for a in results if a != "control"):
        wers = _wers(results[arm], "dev")
        if not set(wers) & set(control):
            continue
        s = paired_summary(control, wers)
        lines.append(
            f"| {arm} | {len(s.seeds)} | {s.control_mean + s.mean:.2f} | {_ci(s)} |"
            f" {_cost(_cost_ratio(results['control'], results[arm]))} |"
        )
    return "\n".join(lines) + "\n"


def objective_table(results: Dict[str, Dict[int, dict]]) -> str:
    """Each arm's own term on dev at the fine-tuning's first and last validation, over the seeds whose results
    recorded it, and the per-seed change with a Student-t 95 % interval: did fine-tuning optimise the objective
    at all? Empty when no result has the curve."""
    from benchmarks.evidence.stats import mean_interval

    lines = []
    for arm in sorted(results):
        curves = [r["objective_curve"] for r in results[arm].values() if r.get("objective_curve")]
        if not any(value for c in curves for _, value in c):
            continue  # no curve, or a term that is 0 on dev (online pseudo-labels act on unlabelled audio only)
        first, last = [c[0][1] for c in curves], [c[-1][1] for c in curves]
        n = len(curves)
        mean, _, lo, hi = mean_interval([b - a for a, b in zip(first, last)])  # per seed: last - first
        ci = "" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]"
        name = Arm(arm, next(iter(results[arm].values()))["overrides"]).objective()
        lines.append(
            f"| {arm} | `val/{name}` | {n} | {sum(first) / n:.3f} (step {curves[0][0][0]}) |"
            f" {sum(last) / n:.3f} (step {curves[0][-1][0]}) | {mean:+.3f}{ci} |"
        )
    if not lines:
        return ""
    head = [
        "| arm | the objective's own term | seeds | first validation | last validation | change, 95 % CI |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def tune_table(results_dir: str, results: Dict[str, Dict[int, dict]], base_dev: Optional[dict]) -> str:
    """The dev-tuning runs (<results>/tune/, from ``--lr`` and ``--weight``) beside the runs the tables use, seed
    by seed; empty when nothing was tuned."""
    tuned = [_read_json(f) for f in sorted(glob.glob(os.path.join(results_dir, "tune", "*_s*.json")))]
    if not tuned:
        return ""
    kept = [r for arm in sorted({t["arm"] for t in tuned}) for r in results.get(arm, {}).values()]
    lines = ["| arm | peak lr | objective weight | seed | dev WER % | in the tables |", "|---|---|---|---|---|---|"]
    if base_dev:
        lines.append(f"| the base, not fine-tuned | — | — | — | {100 * base_dev['wer']:.2f} | |")

    def weight(r: dict) -> Optional[float]:
        return Arm(r["arm"], r["overrides"]).weight()

    for r in sorted(tuned + kept, key=lambda r: (r["arm"], -r["finetune"]["lr"], weight(r) or 0, r["seed"])):
        used = "yes" if r in kept else ""
        w = "—" if weight(r) is None else f"{weight(r):g}"
        lines.append(
            f"| {r['arm']} | {r['finetune']['lr']:g} | {w} | {r['seed']} | {100 * r['metrics']['dev']['wer']:.2f} |"
            f" {used} |"
        )
    return "\n".join(lines) + "\n"


def _ci(s) -> str:
    if s.ci_low is None:
        return f"{s.mean:+.2f} (1 seed) | {100 * s.relative:+.1f} %"
    return (
        f"{s.mean:+.2f} [{s.ci_low:+.2f}, {s.ci_high:+.2f}] | "
        f"{100 * s.relative:+.1f} % [{100 * s.relative_ci_low:+.1f}, {100 * s.relative_ci_high:+.1f}]"
    )


def _cost(ratio: Optional[float]) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


def test_table(results: Dict[str, Dict[int, dict]]) -> str:
    """The final arms on test (seen and unseen voices): paired differences, LLM gain captured, unseen recall."""
    from benchmarks.evidence.stats import llm_gain_captured, paired_summary

    ctrl = results["control"]
    lines = [
        "| arm | voices | seeds | test WER % | vs control (points), 95 % CI | relative, 95 % CI |"
        " LLM gain captured | unseen-word recall % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, voices in (("test_seen", "seen"), ("test_unseen", "unseen")):
        control = _wers(ctrl, split)
        rescored = _wers(ctrl, split, "llm_rescored")
        if not control:
            continue
        c_mean = sum(control.values()) / len(control)
        lines.append(
            f"| control | {voices} | {len(control)} | {c_mean:.2f} | — | — | 0 | {_fmt(_recall(ctrl, split))} |"
        )
        if rescored:
            r_mean = sum(rescored.values()) / len(rescored)
            s = paired_summary(control, rescored)
            lines.append(
                f"| control + LLM rescoring (N={RESCORE['nbest']}, λ={RESCORE['llm_weight']}; reference) | {voices} |"
                f" {len(rescored)} | {r_mean:.2f} | {_ci(s)} | 1 | {_fmt(_recall(ctrl, split, 'llm_rescored'))} |"
            )
        for arm in sorted(a for a in results if a != "control"):
            wers = _wers(results[arm], split)
            if not set(wers) & set(control):
                continue
            s = paired_summary(control, wers)
            common = sorted(set(wers) & set(control) & set(rescored))
            gain = "—"
            if common:
                c = sum(control[k] for k in common) / len(common)
                a = sum(wers[k] for k in common) / len(common)
                rr = sum(rescored[k] for k in common) / len(common)
                gain = f"{llm_gain_captured(c, a, rr):+.2f}" if c > rr else "— (no gain to capture)"
            lines.append(
                f"| {arm} | {voices} | {len(s.seeds)} | {s.control_mean + s.mean:.2f} | {_ci(s)} | {gain} |"
                f" {_fmt(_recall(results[arm], split))} |"
            )
    return "\n".join(lines) + "\n"


def versus_table(results: Dict[str, Dict[int, dict]], pairs: Sequence[tuple]) -> str:
    """Paired differences between two arms other than the control (e.g. LLM-ranked vs greedy pseudo-labels)."""
    from benchmarks.evidence.stats import paired_summary

    lines = [
        "| arm − reference arm | split | seeds | reference WER % | arm WER % | difference (points), 95 % CI |"
        " relative, 95 % CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, ref in pairs:
        if arm not in results or ref not in results:
            continue
        for split in ("dev", "test_seen", "test_unseen"):
            a, b = _wers(results[arm], split), _wers(results[ref], split)
            if set(a) & set(b):
                s = paired_summary(b, a)
                lines.append(
                    f"| {arm} − {ref} | {split} | {len(s.seeds)} | {s.control_mean:.2f} |"
                    f" {s.control_mean + s.mean:.2f} | {_ci(s)} |"
                )
    return "\n".join(lines) + "\n"


def _fmt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.1f}"


def plots(results: Dict[str, Dict[int, dict]], out_dir: str, prefix: str = "evidence") -> List[str]:
    """Paired differences with 95 % CIs (dev, and test where scored) and unseen-word recall per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.evidence.stats import paired_summary

    os.makedirs(out_dir, exist_ok=True)
    written = []
    splits = [s for s in ("dev", "test_seen", "test_unseen") if _wers(results["control"], s)]
    arms = sorted(a for a in results if a != "control")
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 0.45 * len(arms) + 1.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        control = _wers(results["control"], split)
        rows = [(a, _wers(results[a], split)) for a in arms]
        rows = [(a, paired_summary(control, w)) for a, w in rows if set(w) & set(control)]
        rescored = _wers(results["control"], split, "llm_rescored")
        reference = "control + LLM rescoring"  # the LLM at inference: grey, apart from the LLM-free arms
        if rescored:
            rows.append((reference, paired_summary(control, rescored)))
        for i, (name, s) in enumerate(rows):
            lo = s.ci_low if s.ci_low is not None else s.mean
            hi = s.ci_high if s.ci_high is not None else s.mean
            ax.errorbar(
                [s.mean],
                [i],
                xerr=[[s.mean - lo], [hi - s.mean]],
                fmt="o",
                capsize=3,
                color="tab:gray" if name == reference else "tab:blue",  # not the llm_rescoring arm
            )
            ax.annotate(f"n={len(s.seeds)}", (s.mean, i), textcoords="offset points", xytext=(4, 5), fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=8)
        ax.set_xlabel(f"{split} WER − control (points)")
        ax.set_title(split, fontsize=9)
    fig.suptitle("Paired differences to the control, 95 % CI (one seed: no bar)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_paired.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    split = "test_seen" if _wers(results["control"], "test_seen") else "dev"
    names, seen, unseen = [], [], []
    rows = [(arm, arm, None) for arm in ["control", *arms]]
    rows.insert(1, ("control + LLM rescoring", "control", "llm_rescored"))
    for name, arm, key in rows:
        if _scored(results[arm], split, key):
            names.append(name)
            unseen.append(_recall(results[arm], split, key) or 0.0)
            seen.append(_recall(results[arm], split, key, group="seen") or 0.0)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 3.2))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], seen, 0.4, label="words the base heard in training")
    ax.bar([i + 0.2 for i in x], unseen, 0.4, label="words it never heard")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"word recall on {split} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_recall.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def report(p: Paths, report_path: str, plot_dir: str, name: str = "evidence") -> str:
    """Build the generated part of the report from the result files; returns its text."""
    results = load_results(p.results)
    if "control" not in results:
        raise RuntimeError(f"no control result under {p.results}: run the arm stage for 'control' first")
    base = _read_json(p.base_json)
    domain = _read_json(p.domain_json)
    rel = os.path.relpath(plot_dir, os.path.dirname(os.path.abspath(report_path)))
    written = plots(results, plot_dir, prefix=name)
    curve = ", ".join(f"{100 * v:.1f}" for _, v in base["dev_curve"])
    dd = base.get("domain_dev")
    unseen = {k: 100 * v["unseen_word_token_rate"] for k, v in domain["splits"].items()}
    cov = domain.get("test_unseen_coverage")
    text = [
        f"**Base** (`{base['command']}`): {base['steps']:,} steps, stopped by {base['stopped_by']}; demo dev WER at"
        f" each validation: {curve} %; sha256 `{base['sha256'][:16]}…`."
        + (f" On the target domain's dev set, before any fine-tuning: WER {100 * dd['wer']:.2f} %." if dd else ""),
        "",
        "**Target domain**: unseen-word-token rate (words absent from the base's training transcripts) "
        + ", ".join(f"{k} {v:.1f} %" for k, v in unseen.items())
        + "."
        + (
            f" Of the test's {cov['tokens']:,} unseen tokens, {100 * cov['in_adapt']:.1f} % are words of the"
            f" adaptation transcripts, {100 * cov['in_either']:.1f} % of those or of the unlabelled audio the"
            " semi-supervised arms use."
            if cov
            else ""
        ),
        "",
    ]
    tuning = tune_table(p.results, results, dd)
    if tuning:
        text += ["**Dev tuning** (every setting tried, on dev only):", "", tuning]
    text += [
        "**Dev** (where any choice is made; one configuration per arm, "
        + (
            "the learning rate chosen above for all, and for an arm tuned there its rows marked yes):"
            if tuning
            else "none tuned):"
        ),
        "",
        dev_table(results),
    ]
    terms = objective_table(results)
    if terms:
        text += [
            "**Was the objective optimised?** Its own term (the value it adds to the loss, before its weight) on"
            " dev at the fine-tuning's first and last validation (the first comes after a quarter of the steps, not"
            " before any), and the change per seed:",
            "",
            terms,
        ]
    if any(_wers(r, "test_seen") for r in results.values()):
        text += ["**Test** (scored once per final configuration):", "", test_table(results)]
    if "pl_llm" in results and "pl_greedy" in results:
        text += ["**LLM-ranked vs greedy pseudo-labels**, paired by seed:", "", versus_table(results, [VERSUS])]
    text += [" ".join(f"![{os.path.basename(w)}]({rel}/{os.path.basename(w)})" for w in written), ""]
    body = "\n".join(text)
    write_section(report_path, body, "### Evidence tables (generated by `benchmarks/evidence/run.py report`)\n", name)
    return body
