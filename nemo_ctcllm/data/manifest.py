"""Reading and checking NeMo manifests (JSON lines with audio_filepath, duration, text).

Every problem is reported as ``<manifest>:<line>: <reason>`` so that a bad line can be found and fixed;
nothing is silently dropped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional


class ManifestError(ValueError):
    """One or more bad manifest lines; ``problems`` lists them as 'file:line: reason'."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} bad manifest line(s):\n  {shown}{more}")


def resolve_audio_path(path: str, manifest: str) -> str:
    """NeMo resolves a relative audio path against the manifest's folder."""
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(manifest)), path)


def read_manifest(manifest: str) -> List[dict]:
    """Parse every line; malformed JSON raises ManifestError naming file and line."""
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest not found: {manifest}")
    entries, problems = [], []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{manifest}:{lineno}: malformed JSON ({e.msg})")
                continue
            if not isinstance(entry, dict):
                problems.append(f"{manifest}:{lineno}: expected a JSON object, got {type(entry).__name__}")
                continue
            entry["_line"] = lineno
            entries.append(entry)
    if problems:
        raise ManifestError(problems)
    return entries


@dataclass
class CheckConfig:
    """What a usable training line must satisfy."""

    require_text: bool = True
    min_duration: float = 0.05
    max_duration: float = 3600.0
    # CTC needs at least (tokens + repeated neighbours) output frames; frames = duration / frame_shift.
    frame_shift: Optional[float] = None  # seconds per encoder output frame; None = don't check feasibility
    tokenizer: Optional[object] = None  # NeMo TokenizerSpec, to count tokens and find unknown characters


def check_manifest(manifest: str, cfg: CheckConfig = CheckConfig()) -> List[str]:
    """Return 'file:line: reason' for every unusable line (empty list = all good). Reads no audio."""
    problems = []
    try:
        entries = read_manifest(manifest)
    except ManifestError as e:
        return e.problems
    for e in entries:
        where = f"{manifest}:{e['_line']}"
        path = e.get("audio_filepath")
        if not path:
            problems.append(f"{where}: missing 'audio_filepath'")
            continue
        audio = resolve_audio_path(path, manifest)
        if not os.path.isfile(audio):
            problems.append(f"{where}: audio file not found: {audio}")
            continue
        dur = e.get("duration")
        if not isinstance(dur, (int, float)) or isinstance(dur, bool):
            problems.append(f"{where}: missing or non-numeric 'duration' ({dur!r})")
            continue
        if not cfg.min_duration <= dur <= cfg.max_duration:
            problems.append(f"{where}: duration {dur} s outside [{cfg.min_duration}, {cfg.max_duration}]")
            continue
        text = e.get("text")
        if text is None or not str(text).strip():
            if cfg.require_text:
                problems.append(f"{where}: empty or missing 'text'")
            continue
        if cfg.tokenizer is not None:
            ids = cfg.tokenizer.text_to_ids(str(text))
            unk = getattr(cfg.tokenizer, "unk_id", None)
            if unk is not None and unk >= 0 and unk in ids:
                problems.append(f"{where}: text has characters the tokenizer does not know: {text!r}")
                continue
            if cfg.frame_shift:
                frames = int(dur / cfg.frame_shift)
                repeats = sum(1 for a, b in zip(ids, ids[1:]) if a == b)
                if len(ids) + repeats > frames:
                    problems.append(
                        f"{where}: transcript too long for the audio: {len(ids)} tokens (+{repeats} repeats) "
                        f"need more than the {frames} CTC frames of {dur:.2f} s"
                    )
    return problems
