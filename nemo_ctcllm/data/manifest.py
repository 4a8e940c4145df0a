"""Reading and checking NeMo manifests (JSON lines with audio_filepath, duration, text).

Every problem is reported as ``<manifest>:<line>: <reason>`` so that a bad line can be found and fixed;
nothing is silently dropped. :func:`scan_manifest` checks each line on its own (a malformed line does not
hide the others) and returns the usable lines too, so that training can either refuse to start with the
full report or skip exactly the reported lines (``data_checks.skip_bad_utterances``).

What a line is checked for, in order (the first failure is its reason):

=================================  =================================================================
malformed JSON / not an object     ``malformed JSON (<parser message>)``
no ``audio_filepath``              ``missing 'audio_filepath'``
file missing                       ``audio file not found: <path>``
``duration`` missing/non-numeric   ``missing or non-numeric 'duration'``
duration out of bounds             ``duration <d> s outside [min, max]`` (zero or absurd)
header unreadable                  ``unreadable audio: <path> (<libsndfile message>)`` (``check_audio``)
channels                           ``<n> channels, expected 1 (mono)``
sample rate                        ``sample rate <sr> Hz, expected <expected> Hz``
duration vs file                   ``manifest duration <d> s but the file holds <f> s`` (truncated file)
text key absent                    ``missing 'text'`` (unless unlabelled lines are allowed)
empty text                         ``empty 'text'``
unknown characters                 ``text has characters the tokenizer does not know``
CTC infeasible                     ``transcript too long for the audio``
=================================  =================================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional


class ManifestError(ValueError):
    """One or more bad manifest lines; ``problems`` lists them as 'file:line: reason'."""

    def __init__(self, problems: List[str], hint: str = ""):
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} bad manifest line(s):\n  {shown}{more}{hint}")


def resolve_audio_path(path: str, manifest: str) -> str:
    """NeMo resolves a relative audio path against the manifest's folder."""
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(manifest)), path)


def _parse(manifest: str):
    """Yield (lineno, entry or None, problem or None) for every non-blank line."""
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest not found: {manifest}")
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"{manifest}:{lineno}: malformed JSON ({e.msg})"
                continue
            if not isinstance(entry, dict):
                yield lineno, None, f"{manifest}:{lineno}: expected a JSON object, got {type(entry).__name__}"
                continue
            entry["_line"] = lineno
            yield lineno, entry, None


def read_manifest(manifest: str) -> List[dict]:
    """Parse every line; any malformed line raises ManifestError naming file and line."""
    entries, problems = [], []
    for _, entry, problem in _parse(manifest):
        if problem:
            problems.append(problem)
        else:
            entries.append(entry)
    if problems:
        raise ManifestError(problems)
    return entries


@dataclass
class CheckConfig:
    """What a usable training line must satisfy."""

    require_text: bool = True  # False: a line without a 'text' key is an unlabelled utterance (kept)
    min_duration: float = 0.05
    max_duration: float = 3600.0
    # CTC needs at least (tokens + repeated neighbours) output frames; frames = duration / frame_shift.
    frame_shift: Optional[float] = None  # seconds per encoder output frame; None = don't check feasibility
    tokenizer: Optional[object] = None  # NeMo TokenizerSpec, to count tokens and find unknown characters
    check_audio: bool = False  # read each file's header (soundfile): readable, channels, rate, length
    sample_rate: Optional[int] = None  # expected rate when check_audio (None = any)
    duration_tolerance: float = 0.1  # seconds the manifest duration may exceed the file's


@dataclass
class ManifestReport:
    """The outcome of :func:`scan_manifest`: usable entries and one 'file:line: reason' per bad line."""

    manifest: str
    good: List[dict] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    unlabelled: int = 0


def _audio_problem(audio: str, dur: float, cfg: CheckConfig) -> Optional[str]:
    import soundfile

    try:
        info = soundfile.info(audio)
    except Exception as e:  # libsndfile raises RuntimeError/LibsndfileError/TypeError on garbage
        return f"unreadable audio: {audio} ({str(e).strip() or type(e).__name__})"
    if info.channels != 1:
        return f"{info.channels} channels, expected 1 (mono): {audio}"
    if cfg.sample_rate and info.samplerate != cfg.sample_rate:
        return f"sample rate {info.samplerate} Hz, expected {cfg.sample_rate} Hz: {audio}"
    actual = info.frames / float(info.samplerate)
    if dur > actual + cfg.duration_tolerance:
        return f"manifest duration {dur:.2f} s but the file holds {actual:.2f} s (truncated?): {audio}"
    return None


def _line_problem(e: dict, manifest: str, cfg: CheckConfig) -> Optional[str]:
    """The reason line ``e`` is unusable, or None."""
    path = e.get("audio_filepath")
    if not path:
        return "missing 'audio_filepath'"
    audio = resolve_audio_path(path, manifest)
    if not os.path.isfile(audio):
        return f"audio file not found: {audio}"
    dur = e.get("duration")
    if not isinstance(dur, (int, float)) or isinstance(dur, bool):
        return f"missing or non-numeric 'duration' ({dur!r})"
    if not cfg.min_duration <= dur <= cfg.max_duration:
        return f"duration {dur} s outside [{cfg.min_duration}, {cfg.max_duration}]"
    if cfg.check_audio:
        problem = _audio_problem(audio, dur, cfg)
        if problem:
            return problem
    if "text" not in e:
        return None if not cfg.require_text else "missing 'text' (unlabelled lines are not enabled)"
    text = e.get("text")
    if not isinstance(text, str) or not text.strip():
        if not cfg.require_text:
            return f"empty 'text' ({text!r}): remove the 'text' key to mark the line unlabelled, or give a transcript"
        return f"empty 'text' ({text!r})"
    if cfg.tokenizer is not None:
        ids = cfg.tokenizer.text_to_ids(text)
        unk = getattr(cfg.tokenizer, "unk_id", None)
        if unk is not None and unk >= 0 and unk in ids:
            return f"text has characters the tokenizer does not know: {text!r}"
        if cfg.frame_shift:
            frames = int(dur / cfg.frame_shift)
            repeats = sum(1 for a, b in zip(ids, ids[1:]) if a == b)
            if len(ids) + repeats > frames:
                return (
                    f"transcript too long for the audio: {len(ids)} tokens (+{repeats} repeats) "
                    f"need more than the {frames} CTC frames of {dur:.2f} s"
                )
    return None


def scan_manifest(manifest: str, cfg: CheckConfig = CheckConfig()) -> ManifestReport:
    """Check every line of ``manifest`` on its own; see the module docstring for the checks."""
    report = ManifestReport(manifest)
    for lineno, entry, problem in _parse(manifest):
        if problem is None:
            reason = _line_problem(entry, manifest, cfg)
            problem = f"{manifest}:{lineno}: {reason}" if reason else None
        if problem:
            report.problems.append(problem)
            continue
        report.good.append(entry)
        report.unlabelled += "text" not in entry
    return report


def check_manifest(manifest: str, cfg: CheckConfig = CheckConfig()) -> List[str]:
    """'file:line: reason' for every unusable line (empty list = all good)."""
    return scan_manifest(manifest, cfg).problems


def write_text_atomic(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file of this process, then rename: every rank of a job may
    write the same file at once, and a reader sees a whole old or a whole new file, never a half-written one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_manifest(entries: List[dict], source: str, path: str) -> str:
    """Write ``entries`` (from ``source``) as a manifest at ``path``, audio paths made absolute (atomically)."""
    lines = []
    for e in entries:
        line = {k: v for k, v in e.items() if k != "_line"}
        line["audio_filepath"] = os.path.abspath(resolve_audio_path(line["audio_filepath"], source))
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    return write_text_atomic(path, "".join(lines))
