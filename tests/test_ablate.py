"""benchmarks/ablate.py --quick: the whole benchmark pipeline (train, resume-safe bookkeeping, export, score,
table, plots) on a tiny corpus and model; a second call finds every run finished and trains nothing."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def test_ablate_quick_end_to_end_and_skips_finished_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.ablate", "--quick", "--work", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("plain_ctc", "interctc"):
        result = json.load(open(tmp_path / "results" / f"{run}_s0.json"))
        assert set(result["metrics"]) == {"dev", "test", "test_unseen_engine"}
        assert 0.0 <= result["metrics"]["test"]["wer"] and result["dev_curve"]
        assert result["command"].startswith("python scripts/train.py") and result["commit"]
        assert str(tmp_path) not in result["command"] and f"exp_dir=<work>/{run}_s0" in result["command"]
    # the config checkpoints between validations too (every step here, the first before any validation)
    saves = (tmp_path / "interctc_s0" / "train.log").read_text(errors="replace").count(".nemo model saved")
    assert saves >= 4, saves
    # the exported models are plain-CTC sized: the intermediate head is gone
    plain, control = (json.load(open(tmp_path / "results" / f"{r}_s0.json")) for r in ("plain_ctc", "interctc"))
    assert plain["exported_params"] == control["exported_params"]
    report = (tmp_path / "report.md").read_text()
    assert "| plain_ctc | 0 |" in report and "| interctc | 0 |" in report and "<!-- ablation:end -->" in report
    for png in ("ablation_dev_wer.png", "ablation_test_wer.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000

    # inference parity of the exports (benchmarks/bench_export.py): same class, size and parameters as plain CTC
    bench = [
        sys.executable,
        "-m",
        "benchmarks.bench_export",
        "--work",
        str(tmp_path),
        "--rounds",
        "1",
        "--manifest",
        str(tmp_path / "data" / "dev_manifest.json"),
        "--out",
        str(tmp_path / "parity.json"),
    ]
    proc = subprocess.run(bench, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parity = {r["model"]: r for r in json.load(open(tmp_path / "parity.json"))["rows"]}
    assert set(parity) == {"plain_ctc_s0", "interctc_s0"}
    assert {r["class"] for r in parity.values()} == {"EncDecCTCModelBPE"}
    assert parity["interctc_s0"]["params_ratio"] == 1.0 and parity["interctc_s0"]["throughput_ratio"] > 0
    assert len(parity["interctc_s0"]["audio_s_per_s_rounds"]) == 1
    assert "| interctc_s0 | EncDecCTCModelBPE |" in proc.stdout

    log = (tmp_path / "plain_ctc_s0" / "train.log").stat().st_size
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2
    assert (tmp_path / "plain_ctc_s0" / "train.log").stat().st_size == log  # nothing retrained

    # --rescore scores the exports again (per-engine breakdown included) and keeps the training fields
    before = json.load(open(tmp_path / "results" / "interctc_s0.json"))
    proc = subprocess.run(cmd + ["--rescore"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.load(open(tmp_path / "results" / "interctc_s0.json"))
    assert after["metrics"] == before["metrics"] and after["dev_curve"] == before["dev_curve"]
    engines = after["metrics"]["test"]["by_engine"]
    assert sum(e["utterances"] for e in engines.values()) == after["metrics"]["test"]["utterances"]
    assert (tmp_path / "plain_ctc_s0" / "train.log").stat().st_size == log


def test_committed_result_files_name_no_machine_folders():
    from benchmarks.ablation import portable_command

    assert (
        portable_command(
            ["python", "train.py", f"exp_dir={REPO}/artifacts/ablation/x_s0"], str(REPO / "artifacts" / "ablation")
        )
        == "python scripts/train.py exp_dir=artifacts/ablation/x_s0"
    )
    files = sorted((REPO / "docs" / "results").rglob("*.json"))
    assert files
    for path in files:
        text = path.read_text()
        assert str(REPO) not in text, path
        command = json.loads(text).get("command", "")
        assert "=/" not in command and " /" not in command, (path, command)


def test_every_ablation_run_composes_into_a_valid_config():
    """Each run's overrides apply to the ablation config (no training): the objectives it names are enabled."""
    from hydra import compose, initialize_config_dir

    from benchmarks.ablation import RUNS
    from nemo_ctcllm.objectives import registered_objectives

    assert len({r.name for r in RUNS}) == len(RUNS)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for run in RUNS:
            cfg = compose(config_name="conformer_ctc_llm_ablation", overrides=["trainer.max_time=null", *run.overrides])
            enabled = {n for n, b in cfg.model.objectives.items() if b.get("enabled", True)}
            assert enabled <= set(registered_objectives()), run.name
            named = {o.split(".")[2] for o in run.overrides if o.startswith("model.objectives.")}
            assert named <= enabled | {"interctc", "ctc_final"}, run.name
            if run.name != "plain_ctc":
                assert "interctc" in enabled, f"{run.name} must sit on top of the intermediate-CTC control"


def test_a_combination_trains_its_parts_together_and_adds_their_step_costs():
    from benchmarks.ablation import RUNS, SMOLLM2, _cost_cells, combine

    runs = {r.name: r for r in RUNS}
    both = combine("both", [runs["llm_lm_loss"], runs["llm_prefix_clm"]])
    assert both.overrides.count(SMOLLM2) == 1  # one LLM for both objectives
    assert set(runs["llm_lm_loss"].overrides) | set(runs["llm_prefix_clm"].overrides) == set(both.overrides)
    assert both.cost_parts == [("interctc_llm_lm_loss", 4), ("interctc_llm_prefix_clm", 8)]
    bench = {
        "interctc_llm_lm_loss": {"ratio": 3.0, "peak_ratio": 2.0},
        "interctc_llm_prefix_clm": {"ratio": 9.0, "peak_ratio": 4.5},
    }
    # each objective's extra cost is paid on its own share of the steps: 1 + 2/4 + 8/8
    assert _cost_cells({"cost_parts": both.cost_parts}, bench) == ("2.50 (sum of its parts)", "≥ 4.50")
    # a result file from before cost_parts existed still reads as one objective
    old = {"bench_variant": "interctc_llm_lm_loss", "every_n_steps": 4}
    assert _cost_cells(old, bench) == ("1.50 (3.00 every 4 steps)", "2.00")
    assert _cost_cells({"bench_variant": None}, bench) == ("—", "—")


def test_the_table_reports_each_runs_own_logged_step_time_against_plain_ctc_of_its_sitting(tmp_path):
    """The in-training cost column: logged step time over plain CTC's of the same sitting (machine boot), one-thread
    runs only; files from before sittings were recorded share one pool of plain runs."""
    from benchmarks.ablation import sitting_id, summarise

    split = {"wer": 0.5, "cer": 0.2, "utterances": 4}
    for run, seed, secs, threads, sitting in (
        ("plain_ctc", 0, 0.8, "1", None),
        ("plain_ctc", 1, 0.6, "1", None),
        ("llm_reward", 0, 1.4, "1", None),
        ("interctc", 0, 0.3, None, None),
        # a later sitting on a machine twice as fast: its own plain run is the reference
        ("plain_ctc", 2, 0.35, "1", "b00t"),
        ("clip", 0, 0.7, "1", "b00t"),
        ("clip", 1, 1.05, "1", None),
        ("byol", 0, 0.7, "1", "elsewhere"),
    ):
        result = {
            "run": run,
            "seed": seed,
            "metrics": {s: split for s in ("dev", "test")},
            "dev_curve": [[10, 0.6]],
            "steps": 10,
            "train_step_s_mean": secs,
            "omp_num_threads": threads,
            "bench_variant": None,
            **({"sitting": sitting} if sitting else {}),
        }
        (tmp_path / f"{run}_s{seed}.json").write_text(json.dumps(result))
    main_table = summarise(str(tmp_path), str(tmp_path / "plots")).split("seed by seed")[0]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ") for line in main_table.splitlines() if line.startswith("| ")
    }
    assert rows["plain_ctc"][-2] == "1.00" and rows["llm_reward"][-2] == "2.00"  # 1.4 / mean(0.8, 0.6)
    assert rows["clip"][-2] == "1.75"  # mean(0.7 / 0.35, 1.05 / 0.7), not 0.875 / mean(0.8, 0.6, 0.35)
    assert rows["interctc"][-2] == "—"  # two threads (not recorded as one): not comparable
    assert rows["byol"][-2] == "—"  # no plain run in its sitting
    assert sitting_id() and sitting_id() == sitting_id()  # this machine's, recorded by every new result
    assert all((tmp_path / "plots" / f"ablation_{p}_wer.png").stat().st_size > 0 for p in ("dev", "test"))


def test_the_table_pairs_each_run_with_the_control_seed_by_seed(tmp_path):
    """Same seed, same initialisation and data order: the per-seed difference to the control, and its sign."""
    from benchmarks.ablation import summarise

    for run, seed, wer in (
        ("interctc", 0, 0.60),
        ("interctc", 1, 0.70),
        ("plain_ctc", 0, 0.62),
        ("plain_ctc", 1, 0.71),
        ("clip", 0, 0.58),
        ("clip", 1, 0.71),
        ("byol", 3, 0.5),
    ):
        split = {"wer": wer, "cer": 0.2, "utterances": 4}
        result = {
            "run": run,
            "seed": seed,
            "metrics": {s: split for s in ("dev", "test")},
            "dev_curve": [[10, 0.6]],
            "steps": 10,
            "train_step_s_mean": None,
            "bench_variant": None,
        }
        (tmp_path / f"{run}_s{seed}.json").write_text(json.dumps(result))
    table = summarise(str(tmp_path), str(tmp_path / "plots"), order=["plain_ctc", "interctc", "clip", "byol"])
    paired = table[table.index("seed by seed") :]
    assert "| plain_ctc | s0 +2.0, s1 +1.0 | +1.5 | higher on every seed |" in paired
    assert "| clip | s0 -2.0, s1 +1.0 | -0.5 | mixed |" in paired
    assert "| interctc |" not in paired and "| byol |" not in paired  # the control itself; no shared seed


def test_the_benchmark_trains_on_a_prefix_of_the_demo_corpus_with_its_own_tokenizer(demo_corpus, tmp_path):
    from benchmarks.ablation import prepare_corpus

    data = os.path.dirname(demo_corpus["train"])
    overrides = dict(o.split("=", 1) for o in prepare_corpus(data, str(tmp_path), n=20, vocab_size=48))
    manifest, tokenizer = overrides["model.train_ds.manifest_filepath"], overrides["model.tokenizer.dir"]
    assert overrides["demo_dir"] == data
    assert open(manifest).read().splitlines() == open(demo_corpus["train"]).read().splitlines()[:20]
    model = os.path.join(tokenizer, "tokenizer.model")
    stamp = os.path.getmtime(model)
    prepare_corpus(data, str(tmp_path), n=20, vocab_size=48)
    assert os.path.getmtime(model) == stamp  # same texts: the tokenizer is kept
    prepare_corpus(data, str(tmp_path), n=22, vocab_size=48)
    assert os.path.getmtime(model) != stamp  # other texts: trained again, not silently reused
    with pytest.raises(ValueError, match=r"params.json.*at least 25 training utterances"):
        prepare_corpus(data, str(tmp_path), n=25)


def test_each_corpus_size_is_its_own_benchmark_with_its_own_report_section(tmp_path):
    """--train-utterances N writes its own results, plots and RESULTS section; the others are left as they are."""
    from benchmarks.ablation import suite_name, write_section

    assert suite_name(3000) == "ablation" and suite_name(10000) == "ablation_10000"
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n\n<!-- ablation:begin -->\nold 3k\n<!-- ablation:end -->\n\n## Later\n")
    write_section(str(report), "10k table\n", "### 10k", suite_name(10000))
    write_section(str(report), "3k table\n", "### 3k", suite_name(3000))
    write_section(str(report), "10k table, more runs\n", "### 10k", suite_name(10000))
    text = report.read_text()
    assert "old 3k" not in text and "3k table" in text and text.count("10k table") == 1
    assert "10k table, more runs" in text and text.index("## Later") < text.index("<!-- ablation_10000:begin -->")
