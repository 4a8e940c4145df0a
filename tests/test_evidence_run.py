"""The evidence benchmark's runner (benchmarks/evidence/run.py): its quick mode end to end (tiny corpus, base,
domain, arms with two seeds, test scoring with the LLM-rescored reference, report and plots), and the pieces a
reader of its tables relies on (which criterion stopped the base, the semi-supervised manifest, the arm command)."""

import json
import os

import pytest

from benchmarks.evidence import run
from benchmarks.evidence.report import load_results, objective_table, tune_table


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_bpe_llm):
    work = tmp_path_factory.mktemp("evidence")
    run.main(["quick", "--work", str(work), "--llm", tiny_bpe_llm])
    return work


def test_quick_runs_every_stage_and_reports_paired_intervals(quick):
    results = quick / "results"
    base = json.loads((results / "base.json").read_text())
    assert len(base["sha256"]) == 64 and base["bytes"] > 0
    assert base["steps"] > 0 and base["stopped_by"].startswith("max_steps")  # 6 steps, far below the time limit
    assert "domain_dev" in base and 0 <= base["domain_dev"]["wer"]

    arms = load_results(str(results))
    assert {a: sorted(s) for a, s in arms.items()} == {
        "control": [0, 1],
        "pl_greedy": [0, 1],
        "pl_llm": [0],
        "joint_lm": [0],
    }
    for seeds in arms.values():
        for r in seeds.values():
            assert set(r["metrics"]) >= {"dev", "test_seen", "test_unseen"}
            assert r["base_sha256"] == base["sha256"]  # every arm starts from the same bytes
            recall = r["metrics"]["test_seen"]["word_recall"]
            assert recall["unseen"]["tokens"] + recall["seen"]["tokens"] > 0
            assert "<work>/" in r["command"] and str(quick) not in r["command"]  # no machine path in results
    # the reference row: only the control is decoded with the LLM, on both test sets
    assert all("llm_rescored" in arms["control"][0]["metrics"][s] for s in ("test_seen", "test_unseen"))
    with pytest.raises(ValueError, match="the control's"):
        run.test_stage(run.Paths(str(quick), str(results)), "pl_greedy", 0, llm="LLM")
    assert "llm_rescored" not in arms["pl_greedy"][0]["metrics"]["test_seen"]
    assert arms["pl_llm"][0]["data"] == "pl_llm" and "pl_llm_manifest.json" in arms["pl_llm"][0]["command"]
    labels = json.loads((results / "labels.json").read_text())
    assert labels["pl_greedy"]["kept"] + labels["pl_llm"]["kept"] > 0 and 0 <= labels["pl_llm"]["label_wer"]

    report = (quick / "report.md").read_text()
    assert "<!-- evidence:begin -->" in report and "**Dev**" in report and "**Test**" in report
    dev_rows = [line for line in report.splitlines() if line.startswith("| pl_greedy |")]
    assert len(dev_rows) == 3  # dev, test seen, test unseen
    assert all("[" in row for row in dev_rows)  # two seeds: an interval
    assert "(1 seed)" in next(line for line in report.splitlines() if line.startswith("| pl_llm |"))
    assert "control + LLM rescoring" in report
    versus = [line for line in report.splitlines() if line.startswith("| pl_llm − pl_greedy |")]
    assert [row.split(" | ")[1] for row in versus] == ["dev", "test_seen", "test_unseen"]
    # a dev-tuning run (--lr): its own file under tune/, a row of the tuning table, not an arm of the tables
    tuned = [line for line in report.splitlines() if line.startswith("| control | 0.000333333 |")]
    assert len(tuned) == 1 and "**Dev tuning**" in report and (results / "tune").is_dir()
    assert "| control | 0.001 | — | 0 |" in report and "| control | 2 |" in report  # the dev table: seeds 0, 1 only
    # the objective arm recorded its own term at each validation; the control and pl arms have none
    curve = arms["joint_lm"][0]["objective_curve"]
    assert len(curve) >= 1 and all(step > 0 and value > 0 for step, value in curve)
    assert arms["control"][0]["objective_curve"] is None
    terms = [line for line in report.splitlines() if line.startswith("| joint_lm | `val/joint_lm` | 1 |")]
    assert len(terms) == 1 and "**Was the objective optimised?**" in report
    for name in ("evidence_paired.png", "evidence_recall.png"):
        assert (quick / "plots" / name).stat().st_size > 1000 and f"plots/{name}" in report


def test_a_finished_arm_is_not_trained_again(quick):
    p = run.Paths(str(quick), str(quick / "results"))
    before = os.path.getmtime(p.arm_json("control", 0))
    again = run.arm_stage(p, run.ARMS["control"], 0, run.QUICK_FINETUNE, "unused", run.QUICK_MODEL)
    assert again["seed"] == 0 and os.path.getmtime(p.arm_json("control", 0)) == before


def test_a_copied_base_keeps_its_record_and_must_be_the_same_bytes(quick, tmp_path):
    src = run.Paths(str(quick), str(quick / "results"))
    p = run.Paths(str(tmp_path), str(tmp_path / "results"))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "base.json").write_bytes((quick / "results" / "base.json").read_bytes())
    (tmp_path / "base.nemo").write_bytes(open(src.base_nemo, "rb").read())
    assert run.base_stage(p, run.QUICK_BASE) == json.loads((quick / "results" / "base.json").read_text())
    (tmp_path / "base.nemo").write_bytes(b"other bytes")
    with pytest.raises(RuntimeError, match="sha256 differs"):
        run.base_stage(p, run.QUICK_BASE)


def test_semi_manifests_pair_each_labelled_line_with_an_unlabelled_one(quick):
    p = run.Paths(str(quick), str(quick / "results"))
    rows = [json.loads(line) for line in open(run.semi_manifest(p))]
    labelled = [r for r in rows if "text" in r]
    assert len(labelled) == len(rows) - len(labelled) == run.QUICK_DOMAIN["adapt"]
    for kind in ("pl_greedy", "pl_llm"):  # adapt + the same audio with the base's labels (empty ones dropped)
        rows = [json.loads(line) for line in open(p.pl_manifest(kind))]
        human = [r for r in rows if "pseudo_label" not in r]
        assert len(human) == run.QUICK_DOMAIN["adapt"] and all(r["text"] for r in rows)
        audio = {r["audio_filepath"] for r in rows if r.get("pseudo_label") == kind}
        assert audio <= {r["audio_filepath"] for r in map(json.loads, open(p.manifest("unlabelled")))}


def test_arm_command_fixes_everything_but_the_objective(tmp_path):
    p = run.Paths(str(tmp_path), str(tmp_path / "results"))
    (tmp_path / "domain").mkdir()
    for split in ("adapt", "unlabelled"):
        (tmp_path / "domain" / f"{split}_manifest.json").write_text('{"audio_filepath": "a.wav", "duration": 1}\n')
    control = run.arm_command(p, run.ARMS["control"], 3, run.FINETUNE, "LLM", [])
    pl = run.arm_command(p, run.ARMS["llm_pseudo_label"], 3, run.FINETUNE, "LLM", [])
    keys = lambda cmd: dict(a.split("=", 1) for a in cmd[2:] if "=" in a)  # noqa: E731
    c, s = keys(control), keys(pl)
    same = ["seed", "init_from_nemo_model", "trainer.max_steps", "model.optim.lr"]
    same.append("model.validation_ds.manifest_filepath")
    assert all(c[k] == s[k] for k in same)
    assert c["seed"] == "3" and "model.llm.checkpoint" not in c and s["model.llm.checkpoint"] == "LLM"
    # semi-supervised: twice the batch, half of it labelled -> the control's labelled audio per step
    assert float(s["model.train_ds.batch_duration"]) == 2 * float(c["model.train_ds.batch_duration"])
    assert s["model.train_ds.manifest_filepath"].endswith("semi_manifest.json")


@pytest.mark.parametrize(
    "log, expected",
    [
        ("Monitored metric val_wer did not improve in the last 3 records. Best score: 0.300.", "early stopping"),
        ("Time limit reached. Elapsed time is 1:02:00. Signaling Trainer to stop.", "time limit"),
        ("`Trainer.fit` stopped: `max_steps=8400` reached.", "max_steps"),
        ("Epoch 3, global step 100: 'val_wer' reached 0.5", "unknown"),  # 'reached' alone is not a stop
        # a base resumed after a time limit: its log holds both messages, and the last one ended it
        ("Time limit reached. Elapsed time is 1:02:00.\n...\n`Trainer.fit` stopped: `max_steps=8400` reached.", "max_"),
    ],
)
def test_stop_reason_names_the_criterion(log, expected):
    assert run.stop_reason(log).startswith(expected)


def test_the_mlm_teacher_never_reads_the_domains_dev_or_test_sentences(tmp_path):
    from demo.corpus import load_sentences, normalize_text

    shipped = load_sentences()
    selection = {"test": shipped[:3], "dev": [shipped[3].upper()], "adapt": shipped[4:6], "unlabelled": shipped[6:8]}
    (tmp_path / "domain").mkdir()
    (tmp_path / "domain" / "sentences.json").write_text(json.dumps(selection))
    p = run.Paths(str(tmp_path), str(tmp_path / "results"))
    kept = run.mlm_sentences(p)
    held = {normalize_text(s) for s in shipped[:4]}
    assert not held & {normalize_text(s) for s in kept}  # the dev one too, whatever its spelling
    assert len(kept) == len(shipped) - 4 and set(shipped[4:8]) <= set(kept)  # adapt and unlabelled text stay
    # the mlm arm reads the stage's folder, and says which stage to run when it is missing
    with pytest.raises(RuntimeError, match="run the mlm stage first"):
        run.arm_command(p, run.ARMS["mlm"], 0, run.FINETUNE, "LLM", [])
    (tmp_path / "mlm").mkdir()
    (tmp_path / "mlm" / "mlm_eval.json").write_text("{}")
    cmd = run.arm_command(p, run.ARMS["mlm"], 0, run.FINETUNE, "LLM", [])
    assert f"model.objectives.mlm.model_dir={tmp_path / 'mlm'}" in cmd and "model.objectives.mlm.enabled=true" in cmd


def test_weight_tuning_runs_change_only_the_objectives_weight_and_stay_out_of_the_tables(tmp_path, capsys):
    mlm = run.ARMS["mlm"]
    tuned = mlm.with_weight(1.0)
    assert mlm.weight() == 0.1 and tuned.weight() == 1.0 and tuned.name == "mlm"
    changed = [(a, b) for a, b in zip(mlm.overrides, tuned.overrides) if a != b]
    assert changed == [("model.objectives.mlm.weight=0.1", "model.objectives.mlm.weight=1")]
    # llm_prefix_clm's per-block "weights" is not its objective weight
    assert run.ARMS["llm_prefix_clm"].weight() == 0.3
    with pytest.raises(ValueError, match="pl_llm has no objective weight"):
        run.ARMS["pl_llm"].with_weight(1.0)
    p = run.Paths(str(tmp_path), str(tmp_path / "results"), weight=1.0)
    assert p.arm_json("mlm", 0) == str(tmp_path / "results" / "tune" / "mlm_w1_s0.json")
    assert p.arm_exp("mlm", 0).endswith(os.path.join("arms", "mlm_w1_s0"))
    # the tuning table shows the weight beside the runs the tables use
    (tmp_path / "results" / "tune").mkdir(parents=True)
    row = {"finetune": run.FINETUNE, "seed": 0, "metrics": {"dev": {"wer": 0.45}}}
    tuning = {**row, "arm": "mlm", "overrides": tuned.overrides, "metrics": {"dev": {"wer": 0.44}}}
    (tmp_path / "results" / "tune" / "mlm_w1_s0.json").write_text(json.dumps(tuning))
    kept = {**row, "arm": "mlm", "overrides": mlm.overrides}
    table = tune_table(str(tmp_path / "results"), {"mlm": {0: kept}}, None)
    assert "| mlm | 0.0003 | 0.1 | 0 | 45.00 | yes |" in table and "| mlm | 0.0003 | 1 | 0 | 44.00 |  |" in table
    # no weight to tune, or a tuning run sent to test: a clear error, nothing run
    for argv in (["arm", "--arms", "control", "--weight", "1"], ["test", "--arms", "mlm", "--weight", "1"]):
        with pytest.raises(SystemExit):
            run.main([*argv, "--work", str(tmp_path)])
    err = capsys.readouterr().err
    assert "['control'] have no objective weight" in err and "scored on dev only" in err


def test_the_objective_table_gives_each_arms_own_term_and_its_change_with_an_interval():
    assert run.ARMS["simclr"].objective() == "token_contrastive" and run.ARMS["pl_llm"].objective() is None
    arm = run.ARMS["llm_rescoring"]  # a term that is negative: the change, not a relative effect
    curves = {0: [[66, -0.30], [199, -0.35]], 1: [[66, -0.20], [199, -0.21]], 2: [[66, -0.40], [199, -0.42]]}
    runs = {s: {"overrides": arm.overrides, "objective_curve": c} for s, c in curves.items()}
    runs[3] = {"overrides": arm.overrides}  # a run made before the curve was recorded: left out, not zero
    table = objective_table({"llm_rescoring": runs, "control": {0: {"overrides": [], "objective_curve": None}}})
    (row,) = [line for line in table.splitlines() if line.startswith("| llm_rescoring |")]
    # changes -0.05, -0.01, -0.02: mean -0.0267, sd 0.0208, t(0.975, 2) = 4.303, half-width 0.0517
    assert "| `val/llm_rescoring` | 3 | -0.300 (step 66) | -0.327 (step 199) | -0.027 [-0.078, +0.025] |" in row
    assert "| control |" not in table and objective_table({"control": {0: {"overrides": []}}}) == ""
    # the online pseudo-label term is 0 on dev (it acts on unlabelled audio): no row, not a "change" of 0
    self_train = {0: {"overrides": run.ARMS["self_train"].overrides, "objective_curve": [[56, 0.0], [169, 0.0]]}}
    assert objective_table({"self_train": self_train}) == ""
