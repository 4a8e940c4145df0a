"""benchmarks.evidence.stats against hand-computed examples: the paired Student-t interval, the LLM gain
captured and the recall of unseen words."""

import math

import pytest

from benchmarks.evidence.stats import (
    llm_gain_captured,
    paired_summary,
    paired_table,
    t_quantile,
    unseen_token_rate,
    vocabulary,
    word_recall,
)


def test_t_quantiles_match_the_printed_table():
    # two-sided 95 % critical values of Student's t (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(0.95, df) == pytest.approx(value, abs=5e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.95, 0)


def test_paired_interval_by_hand():
    control = {0: 10.0, 1: 12.0, 2: 11.0, 7: 50.0}  # seed 7 has no partner: not paired
    arm = {0: 9.0, 1: 11.5, 2: 9.5, 3: 1.0}
    s = paired_summary(control, arm)
    # d = (-1.0, -0.5, -1.5): mean -1.0; sd = sqrt((0 + 0.25 + 0.25) / 2) = 0.5; se = 0.5 / sqrt(3)
    # half width = 4.302653 * 0.288675 = 1.242069 -> [-2.242069, 0.242069]; control mean 11.0
    assert s.seeds == (0, 1, 2) and s.differences == (-1.0, -0.5, -1.5)
    assert s.mean == pytest.approx(-1.0) and s.sd == pytest.approx(0.5)
    assert s.ci_low == pytest.approx(-2.242069, abs=1e-6) and s.ci_high == pytest.approx(0.242069, abs=1e-6)
    assert s.control_mean == pytest.approx(11.0) and s.relative == pytest.approx(-1.0 / 11.0)
    assert s.relative_ci_low == pytest.approx(-2.242069 / 11.0, abs=1e-6)
    assert not s.excludes_zero
    tight = paired_summary({0: 10.0, 1: 12.0, 2: 11.0}, {0: 9.0, 1: 11.0, 2: 9.9})
    # d = (-1.0, -1.0, -1.1): mean -1.0333, sd 0.057735, half 4.302653 * 0.033333 = 0.143422
    assert tight.ci_high == pytest.approx(-1.033333 + 0.143422, abs=1e-5) and tight.excludes_zero
    one = paired_summary({0: 10.0}, {0: 9.0})
    assert one.ci_low is None and one.sd is None and not one.excludes_zero and one.mean == -1.0
    with pytest.raises(ValueError, match="no common seed"):
        paired_summary({0: 1.0}, {1: 1.0})


def test_llm_gain_captured():
    # control 40, control + rescoring 35 (a 5-point gain); a run at 38 captures 2 of the 5 points
    assert llm_gain_captured(40.0, 38.0, 35.0) == pytest.approx(0.4)
    assert llm_gain_captured(40.0, 35.0, 35.0) == pytest.approx(1.0)
    assert llm_gain_captured(40.0, 41.0, 35.0) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="no LLM gain to capture"):
        llm_gain_captured(40.0, 38.0, 40.0)


def test_unseen_word_recall_by_hand():
    seen = vocabulary(["the cat sat", "on a mat"])
    refs = ["the zebra sat on a mat", "quokka eats the zebra"]
    hyps = ["the zebra sad on mat", "cocker eats a zebra too"]
    r = word_recall(refs, hyps, seen)
    # unseen tokens: zebra, quokka, eats, zebra (4); recalled: zebra (1st), eats, zebra (2nd) -> 3 / 4
    assert r["unseen"] == {"tokens": 4, "recalled": 3, "recall": 0.75}
    # seen tokens: the sat on a mat | the (6); recalled: the, on, mat (sat -> sad, a deleted, the -> a) -> 3 / 6
    assert r["seen"] == {"tokens": 6, "recalled": 3, "recall": 0.5}
    assert unseen_token_rate(refs, seen) == pytest.approx(4 / 10)
    assert word_recall([], [], seen)["unseen"]["recall"] is None
    assert math.isclose(unseen_token_rate(["the cat"], seen), 0.0)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_recall(refs, hyps[:1], seen)


def test_paired_table():
    table = paired_table(
        {"control": {0: 10.0, 1: 12.0, 2: 11.0}, "pl": {0: 9.0, 1: 11.5, 2: 9.5}, "one": {0: 10.5}}, control="control"
    )
    rows = table.splitlines()
    assert rows[0].startswith("| arm | seeds | control | arm | difference (points), 95 % CI")
    assert rows[2] == "| one | 1 | 10.00 | 10.50 | +0.50 (one seed: no interval) | +5.0 % |"
    assert rows[3] == "| pl | 3 | 11.00 | 10.00 | -1.00 [-2.24, +0.24] | -9.1 % [-20.4, +2.2] |"
    with pytest.raises(ValueError, match="no control run 'ctl'"):
        paired_table({"control": {0: 1.0}}, control="ctl")


def test_mean_interval_by_hand_and_for_one_value():
    from benchmarks.evidence.stats import mean_interval

    # 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303, half-width 4.303 / sqrt(3) = 2.484
    mean, sd, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert (mean, sd) == (2.0, 1.0) and lo == pytest.approx(-0.484, abs=1e-3) and hi == pytest.approx(4.484, abs=1e-3)
    assert mean_interval([-0.5]) == (-0.5, None, None, None)  # any sign: not a WER
