"""WER/CER of a .nemo (or an in-memory model) on a NeMo manifest, with a per-utterance output file."""

from __future__ import annotations

import json
import re
from typing import Dict, List, Optional

from nemo_ctcllm.data.manifest import read_manifest, resolve_audio_path

_KEEP = re.compile(r"[^a-z' ]+")


def normalize_text(text: str) -> str:
    """The one normalisation applied to references and every system's output: lowercase, letters and
    apostrophes only, single spaces."""
    return " ".join(_KEEP.sub(" ", text.lower()).split())


def _as_text(hyp) -> str:
    return hyp if isinstance(hyp, str) else hyp.text


def transcribe_manifest(model, manifest: str, batch_size: int = 16) -> List[dict]:
    entries = read_manifest(manifest)
    paths = [resolve_audio_path(e["audio_filepath"], manifest) for e in entries]
    hyps = model.transcribe(paths, batch_size=batch_size, verbose=False)
    if isinstance(hyps, tuple):  # some NeMo versions return (best, all)
        hyps = hyps[0]
    return [
        {
            "audio_filepath": p,
            "text": e.get("text", ""),
            "pred_text": _as_text(h),
            "duration": e.get("duration"),
            "engine": e.get("engine"),
        }
        for p, e, h in zip(paths, entries, hyps)
    ]


def score(rows: List[dict], key: str = "pred_text") -> Dict[str, float]:
    """Corpus WER and CER of the rows' ``key`` (edit distance summed over utterances / reference length), plus
    ``by_engine``: the same per TTS engine where the rows name one (the demo's manifests have an ``engine`` field)."""
    from nemo.collections.asr.metrics.wer import word_error_rate

    refs = [normalize_text(r["text"]) for r in rows]
    hyps = [normalize_text(r[key]) for r in rows]
    result = {
        "wer": word_error_rate(hyps, refs, use_cer=False),
        "cer": word_error_rate(hyps, refs, use_cer=True),
        "utterances": len(rows),
        "words": sum(len(r.split()) for r in refs),
    }
    engines = sorted({r["engine"] for r in rows if r.get("engine")})
    if engines:
        result["by_engine"] = {
            e: score([{**r, "engine": None} for r in rows if r.get("engine") == e], key) for e in engines
        }
    return result


def evaluate(
    model,
    manifest: str,
    out_path: Optional[str] = None,
    batch_size: int = 16,
    llm_host=None,
    nbest: int = 8,
    llm_weight: float = 0.5,
    length_normalize: bool = False,
) -> Dict[str, float]:
    """Transcribe ``manifest`` with ``model`` (an ASRModel or a .nemo path; NeMo's greedy decoding); write
    per-utterance JSON lines. With ``llm_host`` (an :class:`nemo_ctcllm.llm.LLMHost`) each utterance is also
    decoded by N-best LLM rescoring (:mod:`nemo_ctcllm.decoding.llm_rerank`): rows get ``pred_text_llm`` and the
    result an ``llm_rescored`` entry (its WER/CER and settings) beside the greedy scores."""
    if isinstance(model, str):
        from nemo.collections.asr.models import ASRModel

        import nemo_ctcllm  # noqa: F401

        model = ASRModel.restore_from(model, map_location="cpu")
    if llm_host is not None:
        from nemo_ctcllm.decoding.llm_rerank import check_rescoring

        check_rescoring(nbest, llm_weight)  # before the (long) greedy pass
    model.eval()
    rows = transcribe_manifest(model, manifest, batch_size=batch_size)
    if llm_host is not None:
        from nemo_ctcllm.decoding.llm_rerank import rescore_manifest

        texts = rescore_manifest(model, llm_host, manifest, nbest, llm_weight, length_normalize, batch_size)
        for r, t in zip(rows, texts):
            r["pred_text_llm"] = t
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    result = score(rows)
    if llm_host is not None:
        result["llm_rescored"] = {
            **score(rows, "pred_text_llm"),
            "nbest": nbest,
            "llm_weight": llm_weight,
            "length_normalize": length_normalize,
        }
    return result
