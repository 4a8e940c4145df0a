"""The target-domain builder of issue 22 (benchmarks.evidence.domain): the unseen-word rate, splits disjoint
from each other and from the base's sentences, unlabelled manifests without text, seen/unseen voice groups."""

import json

import pytest

from benchmarks.evidence.domain import (
    DomainError,
    base_from_demo_plan,
    base_from_manifests,
    build_domain,
    parse_sizes,
    select_domain,
)
from demo.corpus import normalize_text, voice_inventory

BASE = {
    "train_texts": {"the cat sat on the mat", "a dog ran"},
    "used_texts": {"the cat sat on the mat", "a dog ran", "a dog sat"},
}
SENTENCES = [
    "The cat sat on the mat.",  # the base's: never selected
    "A dog sat.",  # used by the base (its dev, say): never selected
    "The dog ran on the mat.",  # 0 / 6 unseen
    "A zebra sat on the mat.",  # 1 / 6 unseen
    "The zebra ate a quokka.",  # 3 / 5 unseen
    "Zebras eat grass.",  # 3 / 3 unseen
    "the zebra ate a quokka",  # the same sentence again (normalised): once only
    "A quokka sat on the cat.",  # 1 / 6 unseen
]


def test_selection_by_hand():
    sel = select_domain(SENTENCES, BASE, {"test": 1, "dev": 1, "adapt": 0, "unlabelled": 0}, min_unseen=0.5)
    assert sorted(sel["test"] + sel["dev"]) == ["The zebra ate a quokka.", "Zebras eat grass."]
    sel = select_domain(SENTENCES, BASE, {"test": 2, "dev": 1, "adapt": 1, "unlabelled": 0}, min_unseen=0.1)
    chosen = [s for split in sel.values() for s in split]
    assert sorted(chosen) == sorted(
        ["A zebra sat on the mat.", "The zebra ate a quokka.", "Zebras eat grass.", "A quokka sat on the cat."]
    )
    assert len(set(chosen)) == len(chosen)
    again = select_domain(SENTENCES, BASE, {"test": 2, "dev": 1, "adapt": 1, "unlabelled": 0}, min_unseen=0.1)
    assert again == sel  # a fixed seed deals the same splits
    with pytest.raises(DomainError, match="2 held-out sentences have >= 50% unseen words, but the splits ask for 3"):
        select_domain(SENTENCES, BASE, {"test": 3}, min_unseen=0.5)
    with pytest.raises(DomainError, match="--sizes: bad entry 'tset=3'"):
        parse_sizes("tset=3")


def test_base_from_manifests_needs_transcripts(tmp_path):
    m = tmp_path / "train_manifest.json"
    lines = [{"audio_filepath": "a.wav", "text": "the cat"}, {"audio_filepath": "b.wav"}]
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DomainError, match=r"train_manifest.json: line\(s\) \[2\] have no 'text'"):
        base_from_manifests(str(m))


def test_build_tiny_domain_with_audio(tmp_path):
    base = base_from_demo_plan({"train": 300, "dev": 10, "test": 10, "test_unseen_engine": 0})
    sizes = {"test": 2, "dev": 2, "adapt": 3, "unlabelled": 3}
    stats = build_domain(str(tmp_path / "domain"), base, sizes, min_unseen=0.3, workers=2, progress=False)
    out = tmp_path / "domain"
    seen_words = {w for t in base["train_texts"] for w in t.split()}
    rows = {}
    for split in ("adapt", "unlabelled", "dev", "test_seen", "test_unseen"):
        rows[split] = [json.loads(x) for x in (out / f"{split}_manifest.json").read_text().splitlines()]
        for r in rows[split]:
            assert (out / r["audio_filepath"]).stat().st_size > 1000 and r["duration"] > 0.3
    assert all("text" not in r and "sentence" not in r for r in rows["unlabelled"])  # audio only
    assert all(r["text"] for split in ("adapt", "dev", "test_seen", "test_unseen") for r in rows[split])
    selection = json.loads((out / "sentences.json").read_text())
    texts = {k: [normalize_text(s) for s in v] for k, v in selection.items()}
    assert {k: len(v) for k, v in texts.items()} == sizes
    every = [t for v in texts.values() for t in v]
    assert len(set(every)) == len(every) and not set(every) & base["used_texts"]  # disjoint, never the base's
    assert [r["text"] for r in rows["test_seen"]] == [r["text"] for r in rows["test_unseen"]] == texts["test"]
    inventory = voice_inventory()
    for split, group in (("test_seen", "train"), ("test_unseen", "test"), ("adapt", "train"), ("unlabelled", "train")):
        assert all(r["voice"] in inventory[group][r["engine"]] for r in rows[split]), split
    for split, words in ((k, [w for t in v for w in t.split()]) for k, v in texts.items()):
        rate = sum(w not in seen_words for w in words) / len(words)  # by hand, against the base's training words
        assert stats["splits"][split]["unseen_word_token_rate"] == round(rate, 4)
        assert all(sum(w not in seen_words for w in t.split()) / len(t.split()) >= 0.3 for t in texts[split])
    assert json.loads((out / "params.json").read_text())["sizes"] == sizes
