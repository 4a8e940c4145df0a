"""Embedded demo speech corpus: real (synthetic) speech + NeMo manifests, generated offline.

The demo and the tests need a small ASR corpus that can be rebuilt anywhere without network
access. This module synthesises it with the classic Debian text-to-speech engines and writes
NeMo-style manifests.

Text
----
``demo/sentences.txt``: ~41k example sentences from the glosses of WordNet 3.0
(Princeton University; Debian package ``wordnet-base``), extracted and cleaned by
``demo/extract_wordnet_sentences.py``. Licence: the WordNet 3.0 licence (permissive, BSD-like,
requires keeping the copyright notice), see ``demo/LICENSE.wordnet``.
Transcripts are normalised with :func:`normalize_text` (lowercase, ``a-z``, apostrophes,
single spaces). The audio produced from them is generated here and carries no further licence.

The sentence list is split *before* any audio is generated, by a stable hash of the normalised
sentence: 80 % train pool, 8 % dev pool, 12 % test pool (``test`` and ``test_unseen_engine``
take disjoint ends of the same pool). Test/dev sentences therefore never occur in train, and the
split does not depend on the seed or the corpus sizes.

Engines and voices per split
----------------------------
``train`` / ``dev`` (seen voices, unseen sentences for dev), engines 75 % espeak-ng, 25 % flite:
  * espeak-ng (Debian ``espeak-ng``): accents ``en-us, en-gb, en-gb-scotland, en-gb-x-rp,
    en-029, en-gb-x-gbclan, en-us-nyc`` x voice variants ``(none), m1 m2 m3 m5 m6 m7 f1 f2 f4
    klatt klatt2 klatt4 adam Alex Andy Annie aunty benjamin david edward iven Jacky john linda
    max michel Mike norbert paul rob robert shelby steph travis victor`` (7 x 36 = 252 voices);
    speed ``-s`` 130..210 wpm, pitch ``-p`` 25..75.
  * flite (Debian ``flite``): ``kal``, ``kal16``, ``rms``; ``--setf duration_stretch`` 0.8..1.25,
    ``--setf int_f0_target_mean`` = voice mean x 0.8..1.2 (``rms`` ignores it: sox ``pitch``).
``test`` (voices never used in train/dev, same two engines, same mix):
  * espeak-ng: accents above + ``en-gb-x-gbcwmd`` (test only) x variants ``m4 m8 f3 f5 klatt3
    klatt6 Alicia belinda caleb Gene quincy steph2 zac`` (8 x 13 = 104 voices);
  * flite: ``awb``, ``slt``.
``test_unseen_engine`` (an engine never used in train):
  * festival (Debian ``festival`` + ``festvox-kallpc16k``; optional ``festvox-kdlpc16k``,
    ``festvox-us-slt-hts``): ``kal_diphone`` [, ``ked_diphone``, ``cmu_us_slt_arctic_hts``] --
    whichever of these are installed (the list used is recorded in ``params.json``).
    ``Duration_Stretch`` 0.85..1.2, sox ``pitch`` -200..+200 cents. Note: ``kal_diphone`` is
    the same recorded speaker (Kal) as flite's ``kal``/``kal16`` used in train; the *engine*
    (signal generation) is unseen, the speaker is not.

Every utterance draws engine / voice / speed / pitch / level from ``random.Random`` keyed on
``(seed, split, index)``, so a corpus is a deterministic function of its parameters (byte-identical
wavs for the same installed engine versions) and a smaller corpus is a prefix of a larger one.

Audio: 16 kHz mono 16-bit PCM WAV (sox resampling, no dither), peak level -12..-2 dBFS,
leading/trailing silence trimmed (energy threshold, 50 ms margin kept).

Output layout (``out_dir``)::

    train_manifest.json dev_manifest.json test_manifest.json test_unseen_engine_manifest.json
    wavs/<split>/<split>_000000.wav ...
    params.json  stats.json  README.txt

Manifest lines: ``{"audio_filepath", "duration", "text", "engine", "voice", "speaker",
"speed", "pitch", "sentence"}``; ``audio_filepath`` is absolute (or relative to the manifest
directory with ``relative_paths=True``; NeMo resolves those against the manifest's folder).

Usage::

    from demo.corpus import make_demo_corpus
    manifests = make_demo_corpus("demo_data")          # {"train": ".../train_manifest.json", ...}

or ``python -m demo.make_demo_data --out demo_data``.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import soundfile as sf

__all__ = [
    "SPLITS",
    "EngineNotFoundError",
    "normalize_text",
    "load_sentences",
    "split_sentences",
    "plan_corpus",
    "make_demo_corpus",
    "trim_silence",
    "edge_silence_fraction",
]

GENERATOR_VERSION = 1
SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test", "test_unseen_engine")
SENTENCES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentences.txt")

# ----------------------------------------------------------------------------- voices
ESPEAK_TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc")
ESPEAK_TEST_ONLY_ACCENTS = ("en-gb-x-gbcwmd",)
ESPEAK_TRAIN_VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f4",
    "klatt",
    "klatt2",
    "klatt4",
    "adam",
    "Alex",
    "Andy",
    "Annie",
    "aunty",
    "benjamin",
    "david",
    "edward",
    "iven",
    "Jacky",
    "john",
    "linda",
    "max",
    "michel",
    "Mike",
    "norbert",
    "paul",
    "rob",
    "robert",
    "shelby",
    "steph",
    "travis",
    "victor",
)
ESPEAK_TEST_VARIANTS = (
    "m4",
    "m8",
    "f3",
    "f5",
    "klatt3",
    "klatt6",
    "Alicia",
    "belinda",
    "caleb",
    "Gene",
    "quincy",
    "steph2",
    "zac",
)
# flite voice -> mean F0 (Hz) of its default output (None: int_f0_target_mean has no effect -> sox pitch)
FLITE_VOICES = {"kal": 95.0, "kal16": 95.0, "rms": None, "awb": 130.0, "slt": 165.0}
FLITE_TRAIN_VOICES = ("kal", "kal16", "rms")
FLITE_TEST_VOICES = ("awb", "slt")
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
FESTIVAL_VOICE_PACKAGES = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
}
ENGINE_WEIGHTS_SEEN = (("espeak-ng", 0.75), ("flite", 0.25))

# binary -> Debian package
BINARY_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival", "sox": "sox"}

# sentence pools (percent of the stable hash space)
POOL_BOUNDS = (("train", 0, 80), ("dev", 80, 88), ("test", 88, 100))

TRIM_MARGIN_S = 0.05
TRIM_FRAME_S = 0.01
TRIM_REL_DB = -40.0  # frame RMS threshold relative to the loudest frame
TRIM_ABS_DB = -60.0  # ... but never below this (dBFS)


class EngineNotFoundError(RuntimeError):
    """A TTS engine / tool binary (or voice) needed for the requested corpus is not installed."""


# ----------------------------------------------------------------------------- text
_PUNCT_RE = re.compile(r"[.,;:!?]")
_VALID_RE = re.compile(r"^[a-z']+( [a-z']+)*$")


def normalize_text(sentence: str) -> str:
    """Transcript normalisation: lowercase; ``. , ; : ! ?`` removed; ``-`` -> space; single spaces.

    The sentence list is pre-filtered so that the result only contains ``a-z``, apostrophes and
    single spaces; a :class:`ValueError` is raised otherwise.
    """
    s = sentence.lower().replace("-", " ")
    s = _PUNCT_RE.sub(" ", s)
    s = " ".join(s.split())
    if not _VALID_RE.match(s):
        raise ValueError(f"sentence does not normalise to letters/apostrophes/spaces: {sentence!r}")
    return s


def load_sentences(path: str = SENTENCES_PATH) -> List[str]:
    """Sentences (original casing/punctuation) from ``sentences.txt``, comments skipped."""
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def _stable_bucket(text: str, buckets: int = 100) -> int:
    return int(hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()[:8], 16) % buckets


def split_sentences(sentences: Sequence[str]) -> Dict[str, List[str]]:
    """Disjoint sentence pools ``train``/``dev``/``test`` by a stable hash of the normalised text."""
    pools: Dict[str, List[str]] = {name: [] for name, _, _ in POOL_BOUNDS}
    for s in sentences:
        b = _stable_bucket(s)
        for name, lo, hi in POOL_BOUNDS:
            if lo <= b < hi:
                pools[name].append(s)
                break
    return pools


# ----------------------------------------------------------------------------- planning
@dataclass
class Job:
    split: str
    index: int
    engine: str
    voice: str
    sentence: str
    text: str
    speed: float  # espeak: words/min; flite/festival: duration stretch
    pitch: float  # espeak: -p 0..99; flite: target F0 Hz (0: default); festival/rms: sox cents
    sox_pitch_cents: int
    peak_dbfs: float
    path: str  # absolute output path

    @property
    def speaker(self) -> str:
        return f"{self.engine}:{self.voice}"


def _espeak_voices(accents: Iterable[str], variants: Iterable[str]) -> List[str]:
    return [a + (f"+{v}" if v else "") for a in accents for v in variants]


def voice_inventory(festival_voices: Sequence[str] = FESTIVAL_VOICES) -> Dict[str, Dict[str, List[str]]]:
    """split -> engine -> list of voices that split may use."""
    seen = {
        "espeak-ng": _espeak_voices(ESPEAK_TRAIN_ACCENTS, ESPEAK_TRAIN_VARIANTS),
        "flite": list(FLITE_TRAIN_VOICES),
    }
    test = {
        "espeak-ng": _espeak_voices(ESPEAK_TRAIN_ACCENTS + ESPEAK_TEST_ONLY_ACCENTS, ESPEAK_TEST_VARIANTS),
        "flite": list(FLITE_TEST_VOICES),
    }
    return {
        "train": seen,
        "dev": seen,
        "test": test,
        "test_unseen_engine": {"festival": list(festival_voices)},
    }


def _pick_engine(rng: random.Random, engines: Dict[str, List[str]]) -> str:
    if len(engines) == 1:
        return next(iter(engines))
    names = [e for e, _ in ENGINE_WEIGHTS_SEEN]
    weights = [w for _, w in ENGINE_WEIGHTS_SEEN]
    return rng.choices(names, weights=weights, k=1)[0]


def _sentence_order(pool: Sequence[str], seed: int, name: str) -> List[str]:
    order = list(pool)
    random.Random(f"demo-corpus-sentences:{seed}:{name}").shuffle(order)
    return order


def draw_job(
    rng: random.Random, split: str, index: int, engines: Dict[str, List[str]], sentence: str, path: str
) -> Job:
    """One utterance: engine, voice, speed, pitch and level drawn from ``rng`` among ``engines`` (engine -> voices)."""
    engine = _pick_engine(rng, engines)
    voice = rng.choice(engines[engine])
    sox_cents = 0
    if engine == "espeak-ng":
        speed = float(rng.randint(130, 210))
        pitch = float(rng.randint(25, 75))
    elif engine == "flite":
        speed = round(rng.uniform(0.8, 1.25), 3)
        factor = rng.uniform(0.8, 1.2)
        base = FLITE_VOICES[voice]
        if base is None:
            pitch = 0.0
            sox_cents = int(round(1200 * math.log2(factor)))
        else:
            pitch = round(base * factor, 1)
    else:  # festival
        speed = round(rng.uniform(0.85, 1.2), 3)
        sox_cents = rng.randint(-200, 200)
        pitch = 0.0
    peak = round(rng.uniform(-12.0, -2.0), 2)
    return Job(
        split=split,
        index=index,
        engine=engine,
        voice=voice,
        sentence=sentence,
        text=normalize_text(sentence),
        speed=speed,
        pitch=pitch,
        sox_pitch_cents=sox_cents,
        peak_dbfs=peak,
        path=path,
    )


def plan_corpus(
    out_dir: str,
    sizes: Dict[str, int],
    seed: int = 0,
    festival_voices: Sequence[str] = FESTIVAL_VOICES,
    sentences: Optional[Sequence[str]] = None,
) -> Dict[str, List[Job]]:
    """Deterministic list of utterances (no audio) per split."""
    out_dir = os.path.abspath(out_dir)
    pools = split_sentences(load_sentences() if sentences is None else sentences)
    inventory = voice_inventory(festival_voices)
    test_order = _sentence_order(pools["test"], seed, "test")
    orders = {
        "train": _sentence_order(pools["train"], seed, "train"),
        "dev": _sentence_order(pools["dev"], seed, "dev"),
        "test": test_order,
        "test_unseen_engine": test_order[::-1],  # disjoint from `test` while both fit in the pool
    }
    plan: Dict[str, List[Job]] = {}
    for split in SPLITS:
        n = int(sizes.get(split, 0))
        order = orders[split]
        if n > 0 and not order:
            raise ValueError(f"no sentences available for split {split!r}")
        jobs = []
        for i in range(n):
            rng = random.Random(f"demo-corpus:{seed}:{split}:{i}")
            path = os.path.join(out_dir, "wavs", split, f"{split}_{i:06d}.wav")
            jobs.append(draw_job(rng, split, i, inventory[split], order[i % len(order)], path))
        plan[split] = jobs
    return plan


# ----------------------------------------------------------------------------- audio
def _frame_rms_db(x: np.ndarray, frame: int) -> np.ndarray:
    n = len(x) // frame
    if n == 0:
        return np.full(1, -200.0)
    fr = x[: n * frame].reshape(n, frame).astype(np.float64)
    rms = np.sqrt(np.mean(fr * fr, axis=1) + 1e-20)
    return 20 * np.log10(rms + 1e-12)


def _active_region(x: np.ndarray, sr: int) -> tuple:
    """(first, last) sample of the region whose 10 ms frames exceed the energy threshold."""
    frame = max(1, int(round(TRIM_FRAME_S * sr)))
    db = _frame_rms_db(x, frame)
    thr = max(db.max() + TRIM_REL_DB, TRIM_ABS_DB)
    idx = np.flatnonzero(db > thr)
    if idx.size == 0:
        return 0, len(x)
    return int(idx[0]) * frame, min(len(x), (int(idx[-1]) + 1) * frame)


def trim_silence(x: np.ndarray, sr: int = SAMPLE_RATE, margin_s: float = TRIM_MARGIN_S) -> np.ndarray:
    """Cut leading/trailing silence (float audio in [-1, 1]), keeping ``margin_s`` of context."""
    first, last = _active_region(x, sr)
    m = int(round(margin_s * sr))
    return x[max(0, first - m) : min(len(x), last + m)]


def edge_silence_fraction(x: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Fraction of the signal that is leading/trailing silence (same threshold as trimming)."""
    if len(x) == 0:
        return 0.0
    first, last = _active_region(x, sr)
    return 1.0 - (last - first) / len(x)


def _run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    except FileNotFoundError as e:  # pragma: no cover - checked up front
        raise EngineNotFoundError(_missing_message(cmd[0])) from e
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr.decode(errors='replace')}")
    return res


def _synth_raw(job: Job, raw_path: str) -> None:
    if job.engine == "espeak-ng":
        _run(
            [
                "espeak-ng",
                "-v",
                job.voice,
                "-s",
                str(int(job.speed)),
                "-p",
                str(int(job.pitch)),
                "-w",
                raw_path,
                job.sentence,
            ]
        )
    elif job.engine == "flite":
        cmd = ["flite", "-voice", job.voice, "--setf", f"duration_stretch={job.speed:.3f}"]
        if job.pitch > 0:
            cmd += ["--setf", f"int_f0_target_mean={job.pitch:.1f}"]
        _run(cmd + ["-t", job.sentence, "-o", raw_path])
    else:
        raise ValueError(job.engine)


def _festival_batch(jobs: Sequence[Job], raw_paths: Sequence[str], tmp: str) -> None:
    lines = []
    current = None
    for job, raw in zip(jobs, raw_paths):
        if job.voice != current:
            lines.append(f"(voice_{job.voice})")
            current = job.voice
        text = job.sentence.replace("\\", " ").replace('"', " ")
        lines.append(f"(Parameter.set 'Duration_Stretch {job.speed:.3f})")
        lines.append(f'(utt.save.wave (SynthText "{text}") "{raw}" \'riff)')
    script = os.path.join(tmp, "batch.scm")
    with open(script, "w") as f:
        f.write("\n".join(lines) + "\n")
    _run(["festival", "-b", script])
    missing = [p for p in raw_paths if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f"festival did not write {missing[:3]}")


def _postprocess(job: Job, raw_path: str) -> dict:
    """Resample to 16 kHz mono 16 bit (sox), optional pitch shift, level, trim; write; manifest entry."""
    effects = []
    if job.sox_pitch_cents:
        effects += ["pitch", str(job.sox_pitch_cents)]
    effects += ["rate", "-h", str(SAMPLE_RATE)]
    res = _run(
        ["sox", "-D", "-R", "-V1", raw_path, "-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-"] + effects
    )
    x = np.frombuffer(res.stdout, dtype="<f4").astype(np.float64)
    x = trim_silence(x, SAMPLE_RATE)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 0:
        x = x * (10 ** (job.peak_dbfs / 20) / peak)
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")
    os.makedirs(os.path.dirname(job.path), exist_ok=True)
    tmp_out = job.path + ".part"
    sf.write(tmp_out, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp_out, job.path)
    info = sf.info(job.path)
    return {
        "index": job.index,
        "duration": info.frames / info.samplerate,
    }


def _render_chunk(jobs: Sequence[Job]) -> List[dict]:
    """Render a list of jobs (same engine); returns [{index, duration}] in input order."""
    with tempfile.TemporaryDirectory(prefix="demo_tts_") as tmp:
        raws = [os.path.join(tmp, f"raw_{j.index:06d}.wav") for j in jobs]
        if jobs and jobs[0].engine == "festival":
            _festival_batch(jobs, raws, tmp)
            return [_postprocess(j, r) for j, r in zip(jobs, raws)]
        out = []
        for j, r in zip(jobs, raws):
            _synth_raw(j, r)
            out.append(_postprocess(j, r))
            os.remove(r)
        return out


# ----------------------------------------------------------------------------- checks
def _missing_message(binary: str, voice: Optional[str] = None) -> str:
    pkg = BINARY_PACKAGES.get(binary, binary)
    if voice is not None:
        return (
            f"{binary} voice {voice!r} is not installed; install the Debian package "
            f"`{FESTIVAL_VOICE_PACKAGES.get(voice, pkg)}` (apt-get install {FESTIVAL_VOICE_PACKAGES.get(voice, pkg)})"
        )
    extra = " festvox-kallpc16k" if binary == "festival" else ""
    return (
        f"`{binary}` was not found on PATH; it is needed for the demo corpus. Install the Debian "
        f"package(s) `{pkg}{extra}` (apt-get install {pkg}{extra})."
    )


def installed_festival_voices() -> List[str]:
    """Voices of :data:`FESTIVAL_VOICES` that festival reports as installed (in that order)."""
    if shutil.which("festival") is None:
        raise EngineNotFoundError(_missing_message("festival"))
    res = _run(["festival", "-b", "(print (voice.list))"])
    avail = set(res.stdout.decode().replace("(", " ").replace(")", " ").split())
    return [v for v in FESTIVAL_VOICES if v in avail]


def check_engines(engines: Iterable[str]) -> None:
    """Raise :class:`EngineNotFoundError` naming the Debian package for each missing binary/voice."""
    problems = []
    for b in sorted(set(engines) | {"sox"}):
        if shutil.which(b) is None:
            problems.append(_missing_message(b))
    if "flite" in engines and shutil.which("flite"):
        res = subprocess.run(["flite", "-lv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        avail = set(res.stdout.decode().replace("Voices available:", " ").split())
        missing = [v for v in FLITE_VOICES if v not in avail]
        if missing:
            problems.append(f"flite voices {missing} are missing (flite -lv); reinstall the Debian package `flite`")
    if problems:
        raise EngineNotFoundError("\n".join(problems))


# ----------------------------------------------------------------------------- corpus
def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def _manifest_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f"{split}_manifest.json")


def _chunks(jobs: List[Job], size: int) -> List[List[Job]]:
    """Group by engine (and festival voice), then cut into chunks of ``size``."""
    groups: Dict[tuple, List[Job]] = {}
    for j in jobs:
        key = (j.engine, j.voice if j.engine == "festival" else "")
        groups.setdefault(key, []).append(j)
    out = []
    for key in sorted(groups):
        g = groups[key]
        n = size * (3 if key[0] == "festival" else 1)  # amortise festival start-up (~0.3 s)
        out += [g[k : k + n] for k in range(0, len(g), n)]
    return out


def render_jobs(all_jobs: List[Job], workers: int = 2, progress: bool = True) -> Dict[tuple, float]:
    """Synthesise every job's wav; returns {(split, index): duration in seconds}."""
    chunks = _chunks(all_jobs, size=8)
    durations: Dict[tuple, float] = {}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(all_jobs), desc="demo corpus", unit="utt")
        except ImportError:  # pragma: no cover
            bar = None
    key_of = {id(j): (j.split, j.index) for j in all_jobs}
    try:
        if workers <= 1:
            for ch in chunks:
                for j, r in zip(ch, _render_chunk(ch)):
                    durations[key_of[id(j)]] = r["duration"]
                if bar:
                    bar.update(len(ch))
        else:
            # The heavy lifting happens in child processes (espeak-ng/flite/festival + sox), so a
            # thread pool gives `workers` truly parallel pipelines without forking the (possibly
            # torch-loaded) parent interpreter.
            with cf.ThreadPoolExecutor(max_workers=workers) as ex:
                futs = {ex.submit(_render_chunk, ch): ch for ch in chunks}
                for fut in cf.as_completed(futs):
                    ch = futs[fut]
                    for j, r in zip(ch, fut.result()):
                        durations[key_of[id(j)]] = r["duration"]
                    if bar:
                        bar.update(len(ch))
    finally:
        if bar:
            bar.close()
    return durations


def _existing_is_complete(out_dir: str, params: dict) -> bool:
    p = os.path.join(out_dir, "params.json")
    if not os.path.exists(p):
        return False
    try:
        with open(p) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    if old != params:
        return False
    for split in SPLITS:
        mp = _manifest_path(out_dir, split)
        if not os.path.exists(mp):
            return False
        with open(mp) as f:
            for line in f:
                e = json.loads(line)
                ap = e["audio_filepath"]
                if not os.path.isabs(ap):
                    ap = os.path.join(out_dir, ap)
                if not os.path.exists(ap):
                    return False
    return True


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def make_demo_corpus(
    out_dir: str = "demo_data",
    num_train: int = 10000,
    num_dev: int = 200,
    num_test: int = 300,
    num_test_unseen_engine: int = 200,
    seed: int = 0,
    workers: int = 2,
    force: bool = False,
    relative_paths: bool = False,
    progress: bool = True,
) -> Dict[str, str]:
    """Generate (or reuse) the demo corpus; returns ``{split: manifest_path}`` for all four splits.

    Idempotent: if ``out_dir/params.json`` records the same parameters (sizes, seed, path mode,
    generator version, sentence-list hash, festival voices) and every manifest and wav exists,
    nothing is rewritten. ``force=True`` regenerates. ``workers`` parallel synthesis pipelines
    (each utterance runs engine + sox in child processes). Splits with size 0 get an empty manifest.
    """
    out_dir = os.path.abspath(out_dir)
    sizes = {"train": num_train, "dev": num_dev, "test": num_test, "test_unseen_engine": num_test_unseen_engine}
    for k, v in sizes.items():
        if int(v) < 0:
            raise ValueError(f"size of {k} must be >= 0")
    engines_needed = set()
    if num_train or num_dev or num_test:
        engines_needed |= {"espeak-ng", "flite"}
    if num_test_unseen_engine:
        engines_needed.add("festival")
    check_engines(engines_needed)
    festival_voices: List[str] = []
    if num_test_unseen_engine:
        festival_voices = installed_festival_voices()
        if not festival_voices:
            raise EngineNotFoundError(_missing_message("festival", FESTIVAL_VOICES[0]))

    params = {
        "generator_version": GENERATOR_VERSION,
        "sizes": sizes,
        "seed": int(seed),
        "relative_paths": bool(relative_paths),
        "sample_rate": SAMPLE_RATE,
        "sentences_sha256": _file_sha256(SENTENCES_PATH),
        "festival_voices": festival_voices,
    }
    manifests = {s: _manifest_path(out_dir, s) for s in SPLITS}
    if not force and _existing_is_complete(out_dir, params):
        return manifests

    plan = plan_corpus(out_dir, sizes, seed=seed, festival_voices=festival_voices or FESTIVAL_VOICES)
    os.makedirs(out_dir, exist_ok=True)
    stale = os.path.join(out_dir, "params.json")
    if os.path.exists(stale):
        os.remove(stale)  # marks the directory incomplete until we finish
    for split in SPLITS:  # drop wavs of a previous, different run
        d = os.path.join(out_dir, "wavs", split)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d, exist_ok=True)

    durations = render_jobs([j for split in SPLITS for j in plan[split]], workers, progress)

    stats = {"splits": {}, "total": {}}
    for split in SPLITS:
        mp = manifests[split]
        total = 0.0
        engines: Dict[str, int] = {}
        voices = set()
        with open(mp, "w", encoding="utf-8", newline="\n") as f:
            for j in plan[split]:
                dur = durations[(split, j.index)]
                total += dur
                engines[j.engine] = engines.get(j.engine, 0) + 1
                voices.add(j.speaker)
                path = os.path.relpath(j.path, out_dir) if relative_paths else j.path
                entry = {
                    "audio_filepath": path,
                    "duration": dur,
                    "text": j.text,
                    "engine": j.engine,
                    "voice": j.voice,
                    "speaker": j.speaker,
                    "speed": j.speed,
                    "pitch": j.pitch,
                    "pitch_shift_cents": j.sox_pitch_cents,
                    "sentence": j.sentence,
                }
                f.write(json.dumps(entry, ensure_ascii=True) + "\n")
        n = len(plan[split])
        stats["splits"][split] = {
            "manifest": os.path.basename(mp),
            "utterances": n,
            "hours": round(total / 3600, 4),
            "mean_duration_s": round(total / n, 3) if n else 0.0,
            "engines": dict(sorted(engines.items())),
            "num_voices": len(voices),
            "voices": sorted(voices),
            "num_sentences": len({j.sentence for j in plan[split]}),
        }
    # how many of an evaluation split's words the training transcripts never contain: a CTC model trained
    # briefly spells such words mostly wrong, so this bounds what the corpus size can buy (docs/RESULTS.md)
    train_words = {w for j in plan["train"] for w in j.text.split()}
    for split in SPLITS[1:]:
        words = [w for j in plan[split] for w in j.text.split()]
        unseen = sum(w not in train_words for w in words)
        stats["splits"][split]["unseen_word_rate"] = round(unseen / len(words), 4) if words else 0.0
    tot_n = sum(s["utterances"] for s in stats["splits"].values())
    tot_h = sum(sum(durations[(sp, j.index)] for j in plan[sp]) for sp in SPLITS) / 3600
    stats["total"] = {"utterances": tot_n, "hours": round(tot_h, 4)}
    stats["params"] = params
    _write_json(os.path.join(out_dir, "stats.json"), stats)
    _write_readme(out_dir, stats)
    _write_json(os.path.join(out_dir, "params.json"), params)  # last: marks the corpus complete
    return manifests


def _write_readme(out_dir: str, stats: dict) -> None:
    lines = [
        "nemo_ctcllm demo speech corpus (synthetic speech, generated by demo/corpus.py)",
        "",
        "Text: WordNet 3.0 example sentences (Princeton University), WordNet 3.0 licence, see",
        "demo/LICENSE.wordnet. Audio: espeak-ng / flite (train, dev, test) and festival",
        "(test_unseen_engine only); 16 kHz mono 16-bit WAV, leading/trailing silence trimmed.",
        "dev = training voices, unseen sentences; test = unseen voices of the training engines and",
        "unseen sentences; test_unseen_engine = an engine never used in training, unseen sentences.",
        "",
        f"total: {stats['total']['utterances']} utterances, {stats['total']['hours']:.3f} h",
        "",
    ]
    for split, s in stats["splits"].items():
        eng = ", ".join(f"{k}={v}" for k, v in s["engines"].items())
        unseen = f", {100 * s['unseen_word_rate']:.1f} % of its words not in train" if "unseen_word_rate" in s else ""
        lines.append(
            f"{split}: {s['utterances']} utterances, {s['hours']:.3f} h, mean {s['mean_duration_s']:.2f} s, "
            f"{s['num_voices']} voices ({eng}), manifest {s['manifest']}{unseen}"
        )
    lines.append("")
    for split, s in stats["splits"].items():
        lines.append(f"voices in {split}: " + " ".join(s["voices"]))
    with open(os.path.join(out_dir, "README.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
