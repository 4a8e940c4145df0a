"""Statistics of issue 22: per-seed paired differences with a Student-t confidence interval, the share of the
decode-time LLM gain an objective captures, and the recall of words the base never heard in training.

Pairing: seed s fixes the initialisation of the fine-tuning heads and the data order for every arm (with
deterministic loading), so the difference d_s = WER_arm(s) - WER_control(s) removes the share of the seed
that both runs have in common. Over the n seeds that both arms ran,

    mean d̄ = 1/n sum_s d_s,   sd = sqrt(1/(n-1) sum_s (d_s - d̄)^2),   se = sd / sqrt(n)
    95 % CI = d̄ ± t_{0.975, n-1} · se

the interval of a paired t-test (Student 1908; e.g. NIST/SEMATECH e-Handbook of Statistical Methods,
section 7.2.3, "Are the means equal?" for paired data). It assumes the d_s are independent draws from a
roughly normal distribution; with 5 seeds it is wide unless the effect is consistent. The relative effect is
d̄ over the control's mean WER on the same seeds; its interval divides the CI's ends by that mean (the
control's own spread is ignored there, so read it as approximate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from kaldialign import align
from scipy.stats import t as student_t

GAP = "<gap>"  # alignment filler (never a word: words are [a-z']+)


@dataclass(frozen=True)
class PairedSummary:
    """Paired differences (arm - control) over common seeds. ``ci_low``/``ci_high`` are None for one seed."""

    seeds: Tuple[int, ...]
    differences: Tuple[float, ...]
    mean: float
    sd: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    control_mean: float
    relative: float
    relative_ci_low: Optional[float]
    relative_ci_high: Optional[float]
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (False with one seed)."""
        return self.ci_low is not None and (self.ci_high < 0 or self.ci_low > 0)


def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-t critical value: t_{(1 + confidence) / 2, df} (e.g. 4.303 for 95 % and df 2)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(student_t.ppf((1 + confidence) / 2, df))


def mean_interval(
    values: Sequence[float], confidence: float = 0.95
) -> Tuple[float, Optional[float], Optional[float], Optional[float]]:
    """(mean, sd, ci_low, ci_high) of ``values`` with the Student-t interval of the module docstring (sd and the
    interval are None for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, None, None, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def paired_summary(control: Mapping[int, float], arm: Mapping[int, float], confidence: float = 0.95) -> PairedSummary:
    """Per-seed differences arm - control on the seeds both have ({seed: WER}); see the module docstring."""
    seeds = tuple(sorted(set(control) & set(arm)))
    if not seeds:
        raise ValueError(f"no common seed: control has {sorted(control)}, the arm has {sorted(arm)}")
    d = [float(arm[s]) - float(control[s]) for s in seeds]
    control_mean = sum(float(control[s]) for s in seeds) / len(seeds)
    if control_mean <= 0:
        raise ValueError(
            f"the control's mean WER on seeds {list(seeds)} is {control_mean}; a relative effect needs > 0"
        )
    mean, sd, lo, hi = mean_interval(d, confidence)
    rlo = rhi = None
    if lo is not None:
        rlo, rhi = lo / control_mean, hi / control_mean
    return PairedSummary(seeds, tuple(d), mean, sd, lo, hi, control_mean, mean / control_mean, rlo, rhi, confidence)


def llm_gain_captured(wer_control: float, wer_run: float, wer_control_rescored: float) -> float:
    """(WER_control - WER_run) / (WER_control - WER_control+rescoring): 1 = the run's greedy output is as good
    as the control decoded with N-best LLM rescoring, 0 = no better than the control, < 0 = worse."""
    gap = wer_control - wer_control_rescored
    if gap <= 0:
        raise ValueError(
            f"rescoring does not lower the control's WER ({wer_control} -> {wer_control_rescored}): "
            "there is no LLM gain to capture"
        )
    return (wer_control - wer_run) / gap


def vocabulary(texts: Iterable[str]) -> set:
    """The set of words of normalised transcripts (split on white space)."""
    return {w for t in texts for w in t.split()}


def word_recall(refs: Sequence[str], hyps: Sequence[str], seen: set) -> Dict[str, dict]:
    """Recall of reference word tokens, split by whether the word is in ``seen`` (the base's training words).

    A reference token is recalled when the minimum-edit-distance alignment (kaldialign) pairs it with the same
    word in the hypothesis. Returns {"unseen": {"tokens", "recalled", "recall"}, "seen": {...}}; recall is None
    where a group has no token.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    counts = {"unseen": [0, 0], "seen": [0, 0]}
    for ref, hyp in zip(refs, hyps):
        for r, h in align(ref.split(), hyp.split(), GAP):
            if r == GAP:
                continue  # an insertion: no reference token
            group = counts["seen" if r in seen else "unseen"]
            group[0] += 1
            group[1] += int(r == h)
    return {k: {"tokens": n, "recalled": k_, "recall": (k_ / n if n else None)} for k, (n, k_) in counts.items()}


def unseen_token_rate(texts: Iterable[str], seen: set) -> float:
    """Share of the word tokens of ``texts`` that are not in ``seen`` (0 for no token)."""
    words = [w for t in texts for w in t.split()]
    return sum(w not in seen for w in words) / len(words) if words else 0.0


def paired_table(wers: Mapping[str, Mapping[int, float]], control: str, confidence: float = 0.95) -> str:
    """A markdown table of every arm against ``control`` ({arm: {seed: WER in %}}): seeds, the control's and the
    arm's mean on the common seeds, the mean paired difference with its CI, and the relative effect with its CI."""
    if control not in wers:
        raise ValueError(f"no control run {control!r} among {sorted(wers)}")
    pct = int(round(confidence * 100))
    lines = [
        f"| arm | seeds | control | arm | difference (points), {pct} % CI | relative, {pct} % CI |",
        "|---|---|---|---|---|---|",
    ]
    for arm in sorted(a for a in wers if a != control):
        s = paired_summary(wers[control], wers[arm], confidence)
        arm_mean = s.control_mean + s.mean
        if s.ci_low is None:
            diff, rel = f"{s.mean:+.2f} (one seed: no interval)", f"{100 * s.relative:+.1f} %"
        else:
            diff = f"{s.mean:+.2f} [{s.ci_low:+.2f}, {s.ci_high:+.2f}]"
            rel = f"{100 * s.relative:+.1f} % [{100 * s.relative_ci_low:+.1f}, {100 * s.relative_ci_high:+.1f}]"
        lines.append(f"| {arm} | {len(s.seeds)} | {s.control_mean:.2f} | {arm_mean:.2f} | {diff} | {rel} |")
    return "\n".join(lines) + "\n"
