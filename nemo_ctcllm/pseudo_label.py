"""Offline pseudo-labelling of untranscribed audio (``scripts/pseudo_label.py``).

A teacher (a ``.nemo``, optionally with the weights of one or more training checkpoints averaged in, TopIPL's
teacher) labels every line of one or more NeMo manifests. Per utterance, from one pass of the CTC model:

    candidates  C = the N best label sequences (CTC prefix beam search, beam N, :mod:`decoding.nbest`)
                    ∪ {the greedy transcript}
    scores      s_c = a_c + λ·l_c      a_c = log p_CTC(c | x) (summed over alignments),
                                       l_c = log p_LLM(text_c + EOS | BOS) (0 without an LLM)
    label       greedy transcript (default) | argmax_c s_c (``--llm``: the decoder of ``evaluate.py --llm``)
    confidence  softmax_c( s_c / (T · max(1, |c|)) ) at the label    (|c|: its ASR tokens; T: temperature)

i.e. the label's posterior among the candidates under length-normalised scores: 1 when the N-best agrees, low
when close rivals exist. The manifest's ``text``, if any, is never read to label; it is compared with the labels
afterwards (the summary's label WER and calibration table), as a measurement only.

Work goes in *blocks* of consecutive lines (``block_size``), numbered over the concatenated input: shard i of n
takes the blocks b ≡ i (mod n), each block's utterances are batched by duration and its distinct hypotheses scored
by the LLM once, in length-sorted chunks, within the block. A block's result is therefore the same in any shard
and any run, so shards merge to exactly the unsharded output and a resumed run equals an uninterrupted one. Each
finished block is one appended, flushed line of ``labels.<i>of<n>.jsonl``; a rerun skips the blocks already there
(a torn last line from a kill is cut off). The filter (``min_confidence``, ``keep_fraction``) and the temperature act
when the manifest is written (:func:`finalize`), over all shards together: each label keeps its candidates' scores,
so the confidence can be recalibrated without labelling again.

Calibration: T = 1 ranks the labels well but is far from a probability (the length-normalised scores of rival
hypotheses are close). Label a manifest *with* transcripts (a dev set) with the same teacher: its summary gives
``fitted_temperature``, the T that minimises the cross-entropy between the confidence and "the label is exactly
right"; pass it as ``--temperature`` when writing the unlabelled pool's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nemo_ctcllm.data.manifest import ManifestError, read_manifest, resolve_audio_path

LABELS = "labels.{i}of{n}.jsonl"  # one line per finished block
SETTINGS = "settings.json"  # what the labels were made with; a rerun with other settings is refused
MANIFEST = "pseudo_labels.json"  # the filtered NeMo training manifest
SUMMARY = "summary.json"


@dataclass(frozen=True)
class LabelSettings:
    nbest: int = 8  # N of the N-best (the candidates of the confidence, and of the LLM ranking)
    llm_weight: float = 0.5  # λ of a + λ·l (used only with an LLM)
    batch_size: int = 16  # utterances per acoustic forward
    block_size: int = 64  # utterances per unit of work (resume, sharding, LLM batching)
    llm_batch_size: int = 64  # hypotheses per LLM forward


def check_settings(s: LabelSettings) -> None:
    """Clear errors, named as the command's options."""
    for name in ("nbest", "batch_size", "block_size", "llm_batch_size"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if not (isinstance(s.llm_weight, (int, float)) and abs(s.llm_weight) < float("inf")):
        raise ValueError(f"--llm-weight must be a finite number, got {s.llm_weight!r}")


def parse_shard(spec: Optional[str]) -> Tuple[int, int]:
    """'i/n' -> (i, n); None -> this torchrun rank's shard (RANK/WORLD_SIZE), or (0, 1) outside torchrun."""
    if spec is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    return i, n


# ----------------------------------------------------------------------------------------------- input


@dataclass
class Utterance:
    key: str  # "<manifest index>:<line>": unique over the input, and its order
    audio: str  # absolute path
    duration: float
    extra: dict  # the line's other fields, less text (kept in the output manifest)
    reference: Optional[str]  # the line's text, kept apart: never read to label


def read_inputs(manifests: Sequence[str]) -> List[Utterance]:
    """Every line of the manifests, checked up front: a missing file, a missing or unreadable audio file or a
    line without a numeric duration is an error naming the manifest and line (all of them at once)."""
    import soundfile

    if not manifests:
        raise ValueError("no input manifest given")
    out, problems = [], []
    for m, path in enumerate(manifests):
        entries = read_manifest(path)  # ManifestError names malformed lines
        if not entries:
            raise ManifestError([f"{path}: the manifest has no lines"])
        for e in entries:
            where = f"{path}:{e['_line']}"
            if not e.get("audio_filepath"):
                problems.append(f"{where}: missing 'audio_filepath'")
                continue
            audio = os.path.abspath(resolve_audio_path(e["audio_filepath"], path))
            dur = e.get("duration")
            if not os.path.isfile(audio):
                problems.append(f"{where}: audio file not found: {audio}")
                continue
            try:
                info = soundfile.info(audio)
            except Exception as err:  # libsndfile raises several types on garbage
                problems.append(f"{where}: unreadable audio: {audio} ({str(err).strip() or type(err).__name__})")
                continue
            if not isinstance(dur, (int, float)) or isinstance(dur, bool):
                dur = info.frames / float(info.samplerate)  # NeMo needs it: taken from the file
            extra = {k: v for k, v in e.items() if k not in ("_line", "text", "audio_filepath", "duration")}
            text = e.get("text")
            out.append(
                Utterance(f"{m}:{e['_line']}", audio, float(dur), extra, text if isinstance(text, str) else None)
            )
    if problems:
        raise ManifestError(problems)
    return out


def blocks_of(n_items: int, block_size: int, shard: Tuple[int, int]) -> List[int]:
    """This shard's block indices (b ≡ i mod n) over ``n_items`` lines."""
    i, n = shard
    return [b for b in range((n_items + block_size - 1) // block_size) if b % n == i]


# ----------------------------------------------------------------------------------------------- teacher


def load_teacher(model_path: str, checkpoints: Sequence[str] = (), map_location: str = "cpu"):
    """The teacher: a ``.nemo`` restored and stripped of training-only modules (no LLM is built); with
    ``checkpoints`` (Lightning ``.ckpt`` files of a run of that model), their weights averaged replace its own
    (TopIPL's teacher: the average of the top checkpoints)."""
    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401  (registers the package's target prefix)
    from nemo_ctcllm.export import strip_for_inference

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--model: no such file: {model_path}")
    model = ASRModel.restore_from(model_path, map_location=map_location)
    if hasattr(model, "inference_terms"):
        strip_for_inference(model)
    if checkpoints:
        model.load_state_dict(average_checkpoints(checkpoints, model.state_dict().keys()), strict=True)
    return model.eval()


def average_checkpoints(paths: Sequence[str], keys: Iterable[str]) -> Dict[str, Tensor]:
    """The mean of ``keys`` over the checkpoints' ``state_dict`` (integer buffers: the last checkpoint's)."""
    keys = list(keys)
    total: Dict[str, Tensor] = {}
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--checkpoint: no such file: {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"--checkpoint {path}: not a checkpoint of --model (missing {missing[:3]}...)")
        for k in keys:
            v = state[k]
            total[k] = (total[k] + v.double() if k in total else v.double()) if v.is_floating_point() else v
    return {k: (v / len(paths)).float() if v.is_floating_point() else v for k, v in total.items()}


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- labelling


def greedy_ids(log_probs: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """NeMo's greedy CTC decoding: argmax per frame, repeats merged, blanks (the last class) dropped.
    log_probs [B, T, C], lengths [B] -> ids [B, L], label lengths [B]."""
    from nemo_ctcllm.decoding.nbest import collapse_paths

    return collapse_paths(log_probs.argmax(-1), lengths, blank=log_probs.shape[-1] - 1)


def confidence(row: dict, temperature: float = 1.0) -> float:
    """softmax_c(s_c / (T·max(1, |c|))) at the label: its posterior among the row's candidates."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"--temperature must be a positive finite number, got {temperature!r}")
    z = torch.tensor([s / max(1, n) for s, n in zip(row["scores"], row["tokens"])], dtype=torch.float64)
    return float(torch.softmax(z / temperature, 0)[row["chosen"]])


def fit_temperature(rows: Sequence[dict], refs: Sequence[str]) -> dict:
    """The T (on a log grid, 0.01..10) minimising the binary cross-entropy between the confidence and "the label is
    exactly the reference"; with the expected calibration error (5 equal-count bins) at it and at T = 1."""
    from nemo_ctcllm.evaluate import normalize_text

    right = torch.tensor([normalize_text(r["label"]) == normalize_text(t) for r, t in zip(rows, refs)]).double()

    def probs(t: float):
        return torch.tensor([confidence(r, t) for r in rows], dtype=torch.float64).clamp(1e-6, 1 - 1e-6)

    def ece(p):
        order = p.argsort()
        bins = [order[k * len(order) // 5 : (k + 1) * len(order) // 5] for k in range(5)]
        return float(sum(abs(p[b].mean() - right[b].mean()) * len(b) for b in bins if len(b)) / len(order))

    grid = [10 ** (k / 20) for k in range(-40, 21)]
    nll = [float(torch.nn.functional.binary_cross_entropy(probs(t), right)) for t in grid]
    best = grid[min(range(len(grid)), key=nll.__getitem__)]
    return {"temperature": round(best, 4), "ece": round(ece(probs(best)), 4), "ece_at_1": round(ece(probs(1.0)), 4)}


def llm_scores(host, texts: Sequence[str], chunk: int) -> Dict[str, float]:
    """log p_LLM(text + EOS | BOS) of each distinct text, scored in chunks of similar length (less padding)."""
    from nemo_ctcllm.decoding.llm_rerank import llm_log_likelihood

    distinct = sorted(set(texts), key=lambda t: (len(t), t))
    out: Dict[str, float] = {}
    for start in range(0, len(distinct), chunk):
        part = distinct[start : start + chunk]
        out.update(zip(part, llm_log_likelihood(host, part, normalize=False).tolist()))
    return out


@torch.no_grad()
def label_block(model, utts: Sequence[Utterance], settings: LabelSettings, host=None) -> List[dict]:
    """Label one block: rows in the block's order with the label, its confidence and its candidates' count."""
    import soundfile as sf

    from nemo_ctcllm.decoding.nbest import ctc_prefix_beam_search, sequence_log_probs

    device = next(model.parameters()).device
    tok = model.tokenizer
    N = settings.nbest
    found: List[Optional[dict]] = [None] * len(utts)
    order = sorted(range(len(utts)), key=lambda j: (utts[j].duration, j))  # batches of similar length
    for start in range(0, len(order), settings.batch_size):
        idx = order[start : start + settings.batch_size]
        audio = [torch.tensor(sf.read(utts[j].audio, dtype="float32")[0]) for j in idx]
        lens = torch.tensor([len(a) for a in audio])
        signal = torch.zeros(len(audio), int(lens.max()))
        for b, a in enumerate(audio):
            signal[b, : len(a)] = a
        log_probs, enc_len, _ = model.forward(input_signal=signal.to(device), input_signal_length=lens.to(device))
        nb = ctc_prefix_beam_search(log_probs, enc_len, beam_size=N, nbest=N)  # ids [B, N, L]
        g_ids, g_len = greedy_ids(log_probs, enc_len)  # [B, L], [B]
        g_score = sequence_log_probs(log_probs, enc_len, g_ids[:, None], g_len[:, None])[:, 0].cpu()  # [B]
        ids, lengths, scores = nb.ids.tolist(), nb.lengths.tolist(), nb.scores.cpu()
        for b, j in enumerate(idx):
            cands: Dict[str, Tuple[float, int]] = {}  # text -> (acoustic, ASR tokens); the N-best's first
            for n in range(N):
                if scores[b, n] > float("-inf"):
                    text = tok.ids_to_text(ids[b][n][: lengths[b][n]])
                    cands.setdefault(text, (float(scores[b, n]), lengths[b][n]))
            greedy = tok.ids_to_text(g_ids[b, : g_len[b]].tolist())
            cands.setdefault(greedy, (float(g_score[b]), int(g_len[b])))
            found[j] = {"greedy": greedy, "cands": cands}
    lm: Dict[str, float] = {}
    if host is not None:
        lm = llm_scores(host, [t for f in found for t in f["cands"]], settings.llm_batch_size)
    rows = []
    for u, f in zip(utts, found):
        texts = list(f["cands"])
        lam = settings.llm_weight if host is not None else 0.0
        total = [f["cands"][t][0] + lam * lm.get(t, 0.0) for t in texts]
        chosen = max(range(len(texts)), key=lambda c: (total[c], -c)) if host is not None else texts.index(f["greedy"])
        rows.append(
            {
                "key": u.key,
                "label": texts[chosen],
                "chosen": chosen,
                "scores": [round(x, 5) for x in total],  # s_c of every candidate (the confidence's inputs)
                "tokens": [f["cands"][t][1] for t in texts],
                "acoustic": round(f["cands"][texts[chosen]][0], 4),
                **({"llm": round(lm[texts[chosen]], 4)} if host is not None else {}),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- files


def _read_blocks(path: str) -> Dict[int, List[dict]]:
    """{block: rows} of a labels file; a torn last line (a kill mid-write) is cut off the file."""
    blocks: Dict[int, List[dict]] = {}
    if not os.path.isfile(path):
        return blocks
    good = 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n"):
            break
        blocks[rec["block"]] = rec["rows"]
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return blocks


def _append_block(path: str, block: int, rows: List[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"block": block, "rows": rows}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, obj) -> None:
    """Atomic: a temporary file renamed into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _check_settings_file(out_dir: str, record: dict) -> None:
    path = os.path.join(out_dir, SETTINGS)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != record:
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ValueError(
                f"{out_dir} holds labels made with other settings ({', '.join(diff)} differ): use another --out-dir"
                " or delete it"
            )
    else:
        write_json(path, record)


def label_shard(
    model,
    manifests: Sequence[str],
    out_dir: str,
    settings: LabelSettings = LabelSettings(),
    host=None,
    shard: Tuple[int, int] = (0, 1),
    teacher_id: str = "",
    progress: bool = True,
    log=print,
) -> dict:
    """Label this shard's blocks into ``out_dir`` (resuming); returns {'blocks', 'labelled', 'seconds'} of this
    run. ``teacher_id`` names the teacher in the settings record (a rerun with another teacher is refused)."""
    from tqdm import tqdm

    check_settings(settings)
    utts = read_inputs(manifests)
    os.makedirs(out_dir, exist_ok=True)
    record = {
        "manifests": [os.path.abspath(m) for m in manifests],
        "utterances": len(utts),
        "teacher": teacher_id,
        "llm": None if host is None else os.path.abspath(host.checkpoint_dir),
        "shards": shard[1],
        **asdict(settings),
    }
    _check_settings_file(out_dir, record)
    path = os.path.join(out_dir, LABELS.format(i=shard[0], n=shard[1]))
    done = _read_blocks(path)
    todo = [b for b in blocks_of(len(utts), settings.block_size, shard) if b not in done]
    bs = settings.block_size
    start, labelled = time.time(), 0
    bar = tqdm(total=sum(len(utts[b * bs : (b + 1) * bs]) for b in todo), unit="utt", disable=not progress)
    bar.set_description(f"pseudo-labelling shard {shard[0]}/{shard[1]}")
    for b in todo:
        part = utts[b * bs : (b + 1) * bs]
        _append_block(path, b, label_block(model, part, settings, host))
        labelled += len(part)
        bar.update(len(part))
    bar.close()
    seconds = time.time() - start
    if todo:
        log(f"labelled {labelled} utterances in {seconds:.0f} s ({labelled / max(seconds, 1e-9):.2f} utt/s)")
    return {"blocks": len(todo), "labelled": labelled, "seconds": round(seconds, 2)}


# ----------------------------------------------------------------------------------------------- output


def collect(out_dir: str, n_items: int, block_size: int, shards: int) -> List[dict]:
    """Every row of every shard in input order; raises naming the missing blocks when a shard is unfinished."""
    blocks: Dict[int, List[dict]] = {}
    for i in range(shards):
        blocks.update(_read_blocks(os.path.join(out_dir, LABELS.format(i=i, n=shards))))
    want = (n_items + block_size - 1) // block_size
    missing = [b for b in range(want) if b not in blocks]
    if missing:
        shards_left = sorted({b % shards for b in missing})
        raise RuntimeError(
            f"{out_dir}: {len(missing)} of {want} blocks are not labelled yet (shards {shards_left} unfinished):"
            " run them, then merge"
        )
    return [r for b in range(want) for r in blocks[b]]


def select(rows: Sequence[dict], min_confidence: Optional[float], keep_fraction: Optional[float]) -> List[bool]:
    """Which rows to keep: a non-empty label, confidence >= ``min_confidence``, and among those the
    ``keep_fraction`` of *all* rows with the highest confidence (ties: input order)."""
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"--min-confidence must be in [0, 1], got {min_confidence}")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"--keep-fraction must be in (0, 1], got {keep_fraction}")
    keep = [bool(r["label"].strip()) and (min_confidence is None or r["confidence"] >= min_confidence) for r in rows]
    if keep_fraction is not None:
        budget = int(round(keep_fraction * len(rows)))
        ranked = sorted((j for j in range(len(rows)) if keep[j]), key=lambda j: (-rows[j]["confidence"], j))
        chosen = set(ranked[:budget])
        keep = [j in chosen for j in range(len(rows))]
    return keep


def calibration(rows: Sequence[dict], refs: Sequence[str], bins: int = 5) -> List[dict]:  # rows with confidence
    """Per confidence quantile bin: mean confidence, the share of labels exactly right, and the labels' WER."""
    from nemo.collections.asr.metrics.wer import word_error_rate

    from nemo_ctcllm.evaluate import normalize_text

    order = sorted(range(len(rows)), key=lambda j: rows[j]["confidence"])
    out = []
    for k in range(bins):
        part = order[k * len(order) // bins : (k + 1) * len(order) // bins]
        if not part:
            continue
        hyp = [normalize_text(rows[j]["label"]) for j in part]
        ref = [normalize_text(refs[j]) for j in part]
        out.append(
            {
                "utterances": len(part),
                "mean_confidence": round(sum(rows[j]["confidence"] for j in part) / len(part), 4),
                "exact": round(sum(h == r for h, r in zip(hyp, ref)) / len(part), 4),
                "wer": round(word_error_rate(hyp, ref), 4),
            }
        )
    return out


def finalize(
    manifests: Sequence[str],
    out_dir: str,
    min_confidence: Optional[float] = None,
    keep_fraction: Optional[float] = None,
    run: Optional[dict] = None,
    temperature: float = 1.0,
) -> dict:
    """Merge every shard, filter, write ``pseudo_labels.json`` (a NeMo training manifest) and ``summary.json``."""
    from nemo.collections.asr.metrics.wer import word_error_rate

    from nemo_ctcllm.evaluate import normalize_text

    with open(os.path.join(out_dir, SETTINGS), encoding="utf-8") as f:
        record = json.load(f)
    if [os.path.abspath(m) for m in manifests] != record["manifests"]:
        raise ValueError(f"{out_dir} was labelled from {record['manifests']}, not {list(manifests)}")
    utts = read_inputs(manifests)
    rows = collect(out_dir, len(utts), record["block_size"], record["shards"])
    if [r["key"] for r in rows] != [u.key for u in utts]:
        raise RuntimeError(f"{out_dir}: the labels do not match the manifests' lines; relabel into a new folder")
    rows = [{**r, "confidence": round(confidence(r, temperature), 6)} for r in rows]
    keep = select(rows, min_confidence, keep_fraction)
    source = "greedy" if record["llm"] is None else "llm"
    lines = [
        {
            "audio_filepath": u.audio,
            "duration": u.duration,
            **u.extra,
            "text": normalize_text(r["label"]),
            "pl_confidence": r["confidence"],
            "pl_source": source,
        }
        for u, r, k in zip(utts, rows, keep)
        if k
    ]
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    summary = {
        "utterances": len(rows),
        "kept": len(lines),
        "dropped_empty": sum(not r["label"].strip() for r in rows),
        "dropped_filter": sum(bool(r["label"].strip()) and not k for r, k in zip(rows, keep)),
        "kept_hours": round(sum(line["duration"] for line in lines) / 3600, 4),
        "filter": {"min_confidence": min_confidence, "keep_fraction": keep_fraction},
        "temperature": temperature,
        "settings": record,
        "mean_confidence": round(sum(r["confidence"] for r in rows) / len(rows), 4),
    }
    if run is not None:
        summary["this_run"] = {
            **run,
            "utt_per_s": round(run["labelled"] / run["seconds"], 3) if run["seconds"] else None,
        }
    if all(u.reference is not None for u in utts):  # measured after labelling, never used for it
        refs = [normalize_text(u.reference) for u in utts]
        hyps = [normalize_text(r["label"]) for r in rows]
        summary["against_manifest_text"] = {
            "label_wer_all": round(word_error_rate(hyps, refs), 4),
            "label_wer_kept": round(
                word_error_rate([h for h, k in zip(hyps, keep) if k], [x for x, k in zip(refs, keep) if k]), 4
            )
            if any(keep)
            else None,
            "calibration": calibration(rows, refs),
            "fitted_temperature": fit_temperature(rows, refs),
        }
    write_json(os.path.join(out_dir, SUMMARY), summary)
    return summary
