"""Tests for the embedded demo speech corpus generator (demo.corpus).

Generates a tiny corpus (12 train / 4 dev / 4 test / 4 test_unseen_engine) with the Debian TTS
engines; skipped when espeak-ng / flite / festival / sox are not installed.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from demo import corpus as demo

SIZES = dict(num_train=12, num_dev=4, num_test=4, num_test_unseen_engine=4)
_MISSING = [b for b in ("espeak-ng", "flite", "festival", "sox") if shutil.which(b) is None]
needs_engines = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"TTS binaries missing: {_MISSING} (apt-get install espeak-ng flite festival festvox-kallpc16k sox)",
)
TEXT_RE = re.compile(r"^[a-z']+( [a-z']+)*$")


def _read_manifest(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = p
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_a"))
    manifests = demo.make_demo_corpus(out, **SIZES, seed=0, workers=2, progress=False)
    return out, manifests


# ----------------------------------------------------------------------------- no engines needed
def test_sentence_list_is_clean():
    sents = demo.load_sentences()
    assert len(sents) > 5000
    norm = [demo.normalize_text(s) for s in sents]
    assert len(set(norm)) == len(norm), "sentences must be deduplicated"
    for t in norm:
        assert TEXT_RE.match(t), t
        assert 3 <= len(t.split()) <= 20, t
    assert not any(re.search(r"\d", s) for s in sents)
    here = os.path.dirname(demo.__file__)
    assert os.path.exists(os.path.join(here, "LICENSE.wordnet"))


def test_normalize_text():
    assert demo.normalize_text("Don't  go -- now, Mary!") == "don't go now mary"
    assert demo.normalize_text("A well-known fact.") == "a well known fact"
    with pytest.raises(ValueError):
        demo.normalize_text("costs $5")


def test_sentence_pools_disjoint_and_stable():
    sents = demo.load_sentences()
    pools = demo.split_sentences(sents)
    sets = {k: set(v) for k, v in pools.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["dev"]) and not (sets["dev"] & sets["test"])
    assert sum(len(v) for v in pools.values()) == len(sents)
    assert len(pools["test"]) > 0.08 * len(sents) and len(pools["dev"]) > 0.05 * len(sents)
    # independent of the order of the list
    assert demo.split_sentences(sents[::-1])["test"] == pools["test"][::-1]


def test_voice_inventory_disjoint():
    inv = demo.voice_inventory()
    train = {(e, v) for e, vs in inv["train"].items() for v in vs}
    test = {(e, v) for e, vs in inv["test"].items() for v in vs}
    assert not train & test
    assert {e for e, _ in test} == {e for e, _ in train}
    assert set(inv["test_unseen_engine"]) == {"festival"} and "festival" not in inv["train"]


def test_plan_is_prefix_stable():
    small = demo.plan_corpus("/x", {"train": 5, "test": 3}, seed=0)
    big = demo.plan_corpus("/x", {"train": 50, "test": 30}, seed=0)
    assert small["train"] == big["train"][:5] and small["test"] == big["test"][:3]
    other = demo.plan_corpus("/x", {"train": 5}, seed=1)
    assert other["train"] != small["train"]


def test_missing_engine_error_names_package(monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(demo.shutil, "which", lambda b: None if b == "festival" else real_which(b))
    with pytest.raises(demo.EngineNotFoundError, match=r"festival.*apt-get install festival"):
        demo.make_demo_corpus(str(tmp_path / "x"), 1, 0, 0, 1, progress=False)


def test_trim_silence():
    sr = 16000
    t = np.arange(sr) / sr
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    x = np.concatenate([np.zeros(sr // 2), tone, np.zeros(sr)])
    y = demo.trim_silence(x, sr)
    assert abs(len(y) - (sr + 2 * int(0.05 * sr))) <= 2 * 160
    assert demo.edge_silence_fraction(x, sr) > 0.55
    assert demo.edge_silence_fraction(y, sr) < 0.1


# ----------------------------------------------------------------------------- generated corpus
@needs_engines
def test_manifests_and_audio(corpus):
    out, manifests = corpus
    assert set(manifests) == set(demo.SPLITS)
    counts = {"train": 12, "dev": 4, "test": 4, "test_unseen_engine": 4}
    for split, path in manifests.items():
        assert os.path.isabs(path) and os.path.exists(path)
        entries = _read_manifest(path)
        assert len(entries) == counts[split]
        for e in entries:
            assert {"audio_filepath", "duration", "text", "engine", "voice", "speaker"} <= set(e)
            assert os.path.isabs(e["audio_filepath"]) and os.path.exists(e["audio_filepath"])
            info = sf.info(e["audio_filepath"])
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert isinstance(e["duration"], float)
            assert abs(e["duration"] - info.frames / info.samplerate) < 1e-6
            assert 0.3 < e["duration"] < 20
            assert e["text"] and TEXT_RE.match(e["text"]), e["text"]
            x, _ = sf.read(e["audio_filepath"])
            assert np.abs(x).max() > 0.05  # not silent
            assert demo.edge_silence_fraction(x) < 0.15  # trimmed
    for name in ("params.json", "stats.json", "README.txt"):
        assert os.path.exists(os.path.join(out, name))
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["total"]["utterances"] == 24
    train_words = {w for e in _read_manifest(manifests["train"]) for w in e["text"].split()}
    for split in ("dev", "test", "test_unseen_engine"):
        words = [w for e in _read_manifest(manifests[split]) for w in e["text"].split()]
        rate = sum(w not in train_words for w in words) / len(words)
        assert stats["splits"][split]["unseen_word_rate"] == round(rate, 4) and 0 < rate < 1


@needs_engines
def test_split_disjointness(corpus):
    _, manifests = corpus
    m = {s: _read_manifest(p) for s, p in manifests.items()}
    voices = {s: {e["speaker"] for e in es} for s, es in m.items()}
    texts = {s: {e["text"] for e in es} for s, es in m.items()}
    engines = {s: {e["engine"] for e in es} for s, es in m.items()}
    assert not voices["train"] & voices["test"]
    assert not voices["dev"] & voices["test"]
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test_unseen_engine"]
    assert engines["test_unseen_engine"] == {"festival"}
    assert not engines["test_unseen_engine"] & (engines["train"] | engines["dev"])
    # every train/test voice comes from the declared inventory
    inv = demo.voice_inventory()
    assert all(v.split(":", 1)[1] in inv["train"][v.split(":", 1)[0]] for v in voices["train"])
    assert all(v.split(":", 1)[1] in inv["test"][v.split(":", 1)[0]] for v in voices["test"])


@needs_engines
def test_deterministic(corpus, tmp_path):
    out_a, man_a = corpus
    out_b = str(tmp_path / "demo_b")
    man_b = demo.make_demo_corpus(out_b, **SIZES, seed=0, workers=1, progress=False)
    for split in demo.SPLITS:
        a = open(man_a[split]).read().replace(out_a, "<ROOT>")
        b = open(man_b[split]).read().replace(out_b, "<ROOT>")
        assert a == b
    files_a, files_b = _all_files(out_a), _all_files(out_b)
    assert sorted(files_a) == sorted(files_b)
    for rel in files_a:
        if rel.endswith(".wav"):
            with open(files_a[rel], "rb") as fa, open(files_b[rel], "rb") as fb:
                assert fa.read() == fb.read(), rel


@needs_engines
def test_idempotent(corpus):
    out, manifests = corpus
    before = {rel: os.stat(p).st_mtime_ns for rel, p in _all_files(out).items()}
    again = demo.make_demo_corpus(out, **SIZES, seed=0, workers=2, progress=False)
    assert again == manifests
    after = {rel: os.stat(p).st_mtime_ns for rel, p in _all_files(out).items()}
    assert before == after


@needs_engines
def test_relative_paths_resolve_in_nemo(tmp_path):
    out = str(tmp_path / "rel")
    manifests = demo.make_demo_corpus(out, 3, 0, 0, 0, relative_paths=True, progress=False)
    entries = _read_manifest(manifests["train"])
    assert all(not os.path.isabs(e["audio_filepath"]) for e in entries)
    assert all(os.path.exists(os.path.join(out, e["audio_filepath"])) for e in entries)
    collections = pytest.importorskip("nemo.collections.common.parts.preprocessing.collections")
    parsers = pytest.importorskip("nemo.collections.common.parts.preprocessing.parsers")
    parser = parsers.make_parser(labels=list(" abcdefghijklmnopqrstuvwxyz'"))
    data = collections.ASRAudioText(manifests_files=[manifests["train"]], parser=parser)
    assert len(data) == 3
    assert all(os.path.isabs(d.audio_file) and os.path.exists(d.audio_file) for d in data)
