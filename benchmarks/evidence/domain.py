"""The target domain of issue 22: held-out sentences whose words the base has mostly not heard.

Text: the shipped WordNet 3.0 example sentences (``demo/sentences.txt``, WordNet 3.0 licence in
``demo/LICENSE.wordnet``). A sentence is a candidate when the base's corpus (every split of the
demo corpus it was trained on) does not use it; its *unseen share* is the fraction of its word tokens that
never occur in the base's training transcripts. Candidates with an unseen share >= ``min_unseen`` are
eligible; they are shuffled by a fixed seed and dealt in this order into

    test (scored once per final configuration), dev (every selection), adapt (the labelled adaptation set),
    unlabelled (audio-only: manifest lines without ``text``, for semi-supervised arms)

so the splits are disjoint from each other and from the base's sentences, and all four come from the same
distribution. When fewer sentences are eligible than asked for, the builder says so and stops (lower
``min_unseen`` or the sizes); it never pads a split with sentences of a lower unseen share.

Audio: the demo corpus's synthesis (:func:`demo.corpus.draw_job`, :func:`demo.corpus.render_jobs`).
``adapt``, ``unlabelled``, ``dev`` and ``test_seen`` use the voices the base was trained on (so the test
isolates language); ``test_unseen`` speaks the same test sentences in the demo's unseen test voices.

Output (``out_dir``): ``{adapt,unlabelled,dev,test_seen,test_unseen}_manifest.json``, ``wavs/<split>/``,
``sentences.json`` (the selection), ``stats.json`` (sizes, unseen-word-token rates, voices), ``params.json``
(written last: the folder is complete). With ``audio=False`` only the selection and the statistics are written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from typing import Dict, List, Mapping, Optional, Sequence

from benchmarks.evidence.stats import unseen_token_rate, vocabulary
from demo.corpus import (
    SENTENCES_PATH,
    check_engines,
    draw_job,
    load_sentences,
    normalize_text,
    plan_corpus,
    render_jobs,
    voice_inventory,
)
from demo.corpus import (
    SPLITS as DEMO_SPLITS,
)

SPLIT_ORDER = ("test", "dev", "adapt", "unlabelled")  # the order eligible sentences are dealt in
DEFAULT_SIZES = {"test": 500, "dev": 300, "adapt": 500, "unlabelled": 5000}
AUDIO_SPLITS = ("adapt", "unlabelled", "dev", "test_seen", "test_unseen")  # -> (sentence split, voice group)
AUDIO_SOURCE = {
    "adapt": ("adapt", "seen"),
    "unlabelled": ("unlabelled", "seen"),
    "dev": ("dev", "seen"),
    "test_seen": ("test", "seen"),
    "test_unseen": ("test", "unseen"),
}
DEMO_BASE_SIZES = {"train": 10000, "dev": 200, "test": 300, "test_unseen_engine": 200}  # the 10,000-utterance base
VERSION = 1


class DomainError(ValueError):
    """The target domain cannot be built as asked (the message says which setting to change)."""


def base_from_manifests(train_manifest: str, other_manifests: Sequence[str] = ()) -> Dict[str, set]:
    """{"train_texts", "used_texts"} (normalised transcripts) of a base corpus from its manifests."""

    def texts(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        missing = [i + 1 for i, r in enumerate(rows) if "text" not in r]
        if missing:
            raise DomainError(f"{path}: line(s) {missing[:5]} have no 'text'; a base manifest needs transcripts")
        return {normalize_text(r["text"]) for r in rows}

    train = texts(train_manifest)
    used = set(train)
    for m in other_manifests:
        used |= texts(m)
    return {"train_texts": train, "used_texts": used}


def base_from_demo_plan(sizes: Mapping[str, int] = DEMO_BASE_SIZES, seed: int = 0) -> Dict[str, set]:
    """The same sets for the demo corpus of ``sizes``/``seed``, from its plan (no audio needed)."""
    plan = plan_corpus("demo_data", dict(sizes), seed=seed)
    train = {j.text for j in plan["train"]}
    used = {j.text for split in DEMO_SPLITS for j in plan[split]}
    return {"train_texts": train, "used_texts": used}


def select_domain(
    sentences: Sequence[str], base: Mapping[str, set], sizes: Mapping[str, int], min_unseen: float, seed: int = 0
) -> Dict[str, List[str]]:
    """{split: [sentence, ...]} for SPLIT_ORDER (original spelling; see the module docstring)."""
    for name, n in sizes.items():
        if name not in SPLIT_ORDER or not isinstance(n, int) or n < 0:
            raise DomainError(f"sizes: {name}={n!r}; expected integers >= 0 for {list(SPLIT_ORDER)}")
    seen = vocabulary(base["train_texts"])
    eligible, taken = [], set()
    for s in sentences:
        text = normalize_text(s)
        if text in base["used_texts"] or text in taken:
            continue
        taken.add(text)
        if unseen_token_rate([text], seen) >= min_unseen:
            eligible.append(s)
    need = sum(sizes.get(k, 0) for k in SPLIT_ORDER)
    if need > len(eligible):
        raise DomainError(
            f"{len(eligible)} held-out sentences have >= {min_unseen:.0%} unseen words, but the "
            f"splits ask for {need}; lower --min-unseen or the sizes"
        )
    random.Random(f"evidence-domain:{seed}").shuffle(eligible)
    out, start = {}, 0
    for name in SPLIT_ORDER:
        n = sizes.get(name, 0)
        out[name] = eligible[start : start + n]
        start += n
    return out


def domain_stats(selection: Mapping[str, List[str]], base: Mapping[str, set], min_unseen: float) -> dict:
    """Sizes and unseen-word-token rates (against the base's training transcripts) of each split."""
    seen = vocabulary(base["train_texts"])
    splits = {}
    for name, sents in selection.items():
        texts = [normalize_text(s) for s in sents]
        words = [w for t in texts for w in t.split()]
        splits[name] = {
            "sentences": len(texts),
            "word_tokens": len(words),
            "unseen_word_token_rate": round(unseen_token_rate(texts, seen), 4),
            "unseen_word_types": len({w for w in words if w not in seen}),
        }
    return {
        "min_unseen": min_unseen,
        "base_train_sentences": len(base["train_texts"]),
        "base_train_word_types": len(seen),
        "splits": splits,
    }


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def build_domain(
    out_dir: str,
    base: Mapping[str, set],
    sizes: Mapping[str, int] = DEFAULT_SIZES,
    min_unseen: float = 0.25,
    seed: int = 0,
    audio: bool = True,
    workers: int = 2,
    sentences: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> dict:
    """Select, synthesise and write the target domain (see the module docstring); returns the stats."""
    out_dir = os.path.abspath(out_dir)
    selection = select_domain(load_sentences() if sentences is None else sentences, base, sizes, min_unseen, seed)
    stats = domain_stats(selection, base, min_unseen)
    os.makedirs(out_dir, exist_ok=True)
    params_path = os.path.join(out_dir, "params.json")
    if os.path.exists(params_path):
        os.remove(params_path)  # incomplete until written again
    _write_json(os.path.join(out_dir, "sentences.json"), selection)
    if audio:
        check_engines({"espeak-ng", "flite"})
        inventory = voice_inventory()
        voices = {"seen": inventory["train"], "unseen": inventory["test"]}
        jobs = []
        for split in AUDIO_SPLITS:
            source, group = AUDIO_SOURCE[split]
            for i, sentence in enumerate(selection[source]):
                rng = random.Random(f"evidence-domain:{seed}:{split}:{i}")
                path = os.path.join(out_dir, "wavs", split, f"{split}_{i:06d}.wav")
                jobs.append(draw_job(rng, split, i, voices[group], sentence, path))
        durations = render_jobs(jobs, workers=workers, progress=progress)
        stats["manifests"] = {}
        for split in AUDIO_SPLITS:
            mine = [j for j in jobs if j.split == split]
            path = os.path.join(out_dir, f"{split}_manifest.json")
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                for j in mine:
                    entry = {
                        "audio_filepath": os.path.relpath(j.path, out_dir),
                        "duration": durations[(split, j.index)],
                        "engine": j.engine,
                        "voice": j.voice,
                        "speaker": j.speaker,
                        "voice_group": AUDIO_SOURCE[split][1],
                    }
                    if split != "unlabelled":  # audio only: no transcript, not even the sentence
                        entry["text"] = j.text
                    f.write(json.dumps(entry, ensure_ascii=True) + "\n")
            stats["manifests"][split] = {
                "manifest": os.path.basename(path),
                "utterances": len(mine),
                "hours": round(sum(durations[(split, j.index)] for j in mine) / 3600, 4),
                "voices": len({j.speaker for j in mine}),
            }
    params = {
        "version": VERSION,
        "sizes": dict(sizes),
        "min_unseen": min_unseen,
        "seed": seed,
        "audio": audio,
        "sentences_sha256": _sha256(SENTENCES_PATH) if sentences is None else None,
    }
    stats["params"] = params
    _write_json(os.path.join(out_dir, "stats.json"), stats)
    _write_json(params_path, params)
    return stats


def parse_sizes(text: str) -> Dict[str, int]:
    """'test=500,dev=300,...' -> dict (unnamed splits keep their defaults)."""
    sizes = dict(DEFAULT_SIZES)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in SPLIT_ORDER or not value.isdigit():
            raise DomainError(f"--sizes: bad entry {part!r}; expected name=count with name in {list(SPLIT_ORDER)}")
        sizes[name] = int(value)
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--base-corpus", help="the base's demo-corpus folder (its train manifest + every other one)")
    src.add_argument(
        "--base-demo-train",
        type=int,
        default=DEMO_BASE_SIZES["train"],
        help="otherwise: the planned demo corpus with this many training utterances (no audio needed)",
    )
    ap.add_argument("--base-demo-seed", type=int, default=0)
    ap.add_argument(
        "--sizes", default="", help="e.g. test=500,dev=300,adapt=500,unlabelled=5000 (these are the defaults)"
    )
    ap.add_argument("--min-unseen", type=float, default=0.25, help="eligible: at least this share of unseen words")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-audio", action="store_true", help="select and measure only")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.base_corpus:
        names = [f"{s}_manifest.json" for s in DEMO_SPLITS]
        paths = [os.path.join(args.base_corpus, n) for n in names]
        base = base_from_manifests(paths[0], [p for p in paths[1:] if os.path.exists(p)])
    else:
        base = base_from_demo_plan({**DEMO_BASE_SIZES, "train": args.base_demo_train}, args.base_demo_seed)
    stats = build_domain(
        args.out,
        base,
        parse_sizes(args.sizes),
        args.min_unseen,
        args.seed,
        audio=not args.no_audio,
        workers=args.workers,
    )
    print(json.dumps({k: stats[k] for k in ("base_train_sentences", "splits")}, indent=2))
    return stats


if __name__ == "__main__":
    main()
