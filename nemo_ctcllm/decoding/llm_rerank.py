"""How often the frozen LLM changes the CTC model's top hypothesis on a manifest (and what that does to WER).

For every utterance: the N-best of the model's CTC posteriors (:func:`ctc_prefix_beam_search`, beam = N, as
``llm_rescoring``/``llm_pseudo_label`` use it in training), acoustic scores a_n = log p(y_n | x), LLM scores
l_n = log p_LLM(text_n + EOS | BOS), and the rescored choice argmax_n a_n + λ·l_n. Reported per (N, λ): the
fraction of utterances whose top hypothesis changes, and the corpus WER of the acoustic top, the rescored top
and the N-best oracle (references and hypotheses normalised as in :mod:`nemo_ctcllm.evaluate`).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from nemo_ctcllm.data.manifest import read_manifest, resolve_audio_path
from nemo_ctcllm.decoding.nbest import ctc_prefix_beam_search
from nemo_ctcllm.evaluate import normalize_text


def audio_batches(manifest: str, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[str]]]:
    """(signal [B, S], lengths [B], reference texts) per batch of the manifest, in order."""
    import soundfile as sf

    entries = read_manifest(manifest)
    for start in range(0, len(entries), batch_size):
        chunk = entries[start: start + batch_size]
        audio = [torch.tensor(sf.read(resolve_audio_path(e["audio_filepath"], manifest), dtype="float32")[0])
                 for e in chunk]
        lens = torch.tensor([len(a) for a in audio])
        signal = torch.zeros(len(audio), int(lens.max()))
        for i, a in enumerate(audio):
            signal[i, : len(a)] = a
        yield signal, lens, [e.get("text", "") for e in chunk]


def _errors(hyp: str, ref: str) -> int:
    from kaldialign import edit_distance

    return int(edit_distance(normalize_text(ref).split(), normalize_text(hyp).split())["total"])


@torch.no_grad()
def llm_top_changed(model, host, manifest: str, nbest: Sequence[int] = (4, 8, 16), lm_weights: Sequence[float] = (0.5,),
                    length_normalize: bool = False, batch_size: int = 16) -> Dict[str, Dict[str, float]]:
    """{"n<N>_lm<λ>": {top_changed, wer_acoustic_top, wer_rescored_top, wer_oracle, utterances}}."""
    from nemo_ctcllm.objectives.hypotheses import llm_log_likelihood

    model.eval()
    tok = model.tokenizer
    llm_cache: Dict[str, float] = {}
    acc = {(n, lam): {"changed": 0, "acoustic": 0, "rescored": 0, "oracle": 0} for n in nbest for lam in lm_weights}
    utts = words = 0
    for signal, lens, refs in audio_batches(manifest, batch_size):
        device = next(model.parameters()).device
        log_probs, enc_len, _ = model.forward(input_signal=signal.to(device), input_signal_length=lens.to(device))
        utts += len(refs)
        words += sum(len(normalize_text(r).split()) for r in refs)
        for n in nbest:
            nb = ctc_prefix_beam_search(log_probs, enc_len, beam_size=n, nbest=n)
            ids, hl = nb.ids.tolist(), nb.lengths.tolist()
            texts = [[tok.ids_to_text(ids[b][k][: hl[b][k]]) for k in range(n)] for b in range(len(refs))]
            missing = sorted({t for row in texts for t in row} - set(llm_cache))
            if missing:
                llm_cache.update(zip(missing, llm_log_likelihood(host, missing, length_normalize).tolist()))
            a = nb.scores.cpu()  # [B, N], -inf where no hypothesis
            lm = torch.tensor([[llm_cache[t] for t in row] for row in texts])  # [B, N]
            errs = torch.tensor([[_errors(t, r) for t in row] for row, r in zip(texts, refs)]).float()
            errs = errs.masked_fill(~nb.valid.cpu(), float("inf"))
            top = a.argmax(1)
            rows = torch.arange(len(refs))
            for lam in lm_weights:
                best = (a + lam * lm).argmax(1)
                s = acc[(n, lam)]
                s["changed"] += int((best != top).sum())
                s["acoustic"] += int(errs[rows, top].sum())
                s["rescored"] += int(errs[rows, best].sum())
                s["oracle"] += int(errs.min(1).values.sum())
    words = max(words, 1)
    return {
        f"n{n}_lm{lam}": {"top_changed": s["changed"] / max(utts, 1), "wer_acoustic_top": s["acoustic"] / words,
                          "wer_rescored_top": s["rescored"] / words, "wer_oracle": s["oracle"] / words,
                          "utterances": utts}
        for (n, lam), s in acc.items()
    }
