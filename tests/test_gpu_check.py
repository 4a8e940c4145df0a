"""scripts/gpu_check.py --dry-run on this CPU: every part of the one-call GPU check runs end to end on tiny shapes
(real megatron host vs Hugging Face, real recipe training with llm_prefix_clm + clip under bf16-mixed, the
CUDA-dependent test modules collected), so the GPU call is not the script's first run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, load_script

gpu_check = load_script(REPO / "scripts" / "gpu_check.py")


def test_dry_run_writes_every_part(demo_corpus, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = Path(demo_corpus["train"]).read_text().splitlines()[:12]  # absolute paths: the folder need not travel
    (audio / "manifest.json").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "gpu_check.py"),
        "--dry-run",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--audio",
        str(audio),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "gpu_check.json").read_text())
    assert set(gpu_check.PARTS) <= set(result)
    for part in gpu_check.PARTS:
        assert result[part]["ok"], (part, result[part].get("error"))
        assert json.loads((out / f"{part}.json").read_text()) == result[part]
    env_part, host, rate, train, tests = (result[p] for p in gpu_check.PARTS)
    assert env_part["megatron_core"] and env_part["nemo"].startswith("3.")
    assert env_part["llm_final_norm"].endswith("RMSNorm")
    assert host["tokens"] > 0 and host["max_abs_err_host_vs_fp32"] <= host["tolerance"]
    for shape in ("smollm2_135m_shape", "llama_3.2_1b_shape"):
        assert rate[shape]["tokens_per_s"] > 0 and rate[shape]["peak_mib"] > 0
    assert train["steps"] == 3 and train["precision"] == "bf16-mixed"
    assert {"llm_prefix_clm", "clip"} <= set(train["objectives"])
    assert train["median_step_s"] > 0 and train["first_loss"] == train["first_loss"]  # not NaN
    assert tests["modules"] == gpu_check.cuda_test_modules() and tests["collected"] > 0


def test_cuda_test_modules_are_the_ones_that_branch_on_cuda():
    modules = gpu_check.cuda_test_modules()
    assert "tests/test_llm_host.py" in modules and "tests/test_gpu_check.py" not in modules  # no recursion
    for path in modules:
        assert gpu_check.CUDA_BRANCH.search((REPO / path).read_text())


def test_audio_manifest_names_the_bad_line(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps({"audio_filepath": "missing.wav", "duration": 1.0, "text": "a"}) + "\n"
    )
    with pytest.raises(FileNotFoundError, match=r"manifest\.json:1: .*missing\.wav"):
        gpu_check.audio_manifest(tmp_path, tmp_path / "out.json")


@pytest.mark.parametrize(
    "body,ok", [("def test_a():\n    assert True\n", True), ("import no_such_module_here\n", False)]
)
def test_tests_part_verdict_follows_pytest(body, ok, tmp_path, monkeypatch):
    """The tests part is ok only when pytest is: a module that fails to import (a collection error, where the part
    used to report ok) fails the part, and run_parts then reports it and main exits non-zero."""
    module = tmp_path / "test_probe_module.py"
    module.write_text(body)
    monkeypatch.setattr(gpu_check, "cuda_test_modules", lambda: [str(module)])
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--parts", "tests"])
    results = gpu_check.run_parts(args)
    assert results["tests"]["ok"] is ok, results["tests"]
