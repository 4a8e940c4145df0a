"""Decode-time N-best LLM rescoring (``scripts/evaluate.py --llm``).

For every utterance: the N best label sequences of the model's final CTC posteriors (:func:`ctc_prefix_beam_search`,
beam = N, as the ``llm_rescoring``/``llm_pseudo_label`` objectives search in training), their acoustic scores
a_n = log p_CTC(y_n | x) (summed over alignments), the frozen LLM's l_n = log p_LLM(text_n + EOS | BOS) (summed
over the LLM's tokens, or divided by their number), and the rescored choice argmax_n a_n + λ·l_n. EOS is scored so
that an empty or truncated hypothesis is not favoured. λ = 0 gives the N-best's acoustic top (which can differ from
greedy decoding: it sums over alignments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nemo_ctcllm.data.manifest import read_manifest, resolve_audio_path
from nemo_ctcllm.decoding.nbest import ctc_prefix_beam_search
from nemo_ctcllm.llm.tp import gather_objects


@torch.no_grad()
def llm_log_likelihood(host, texts: Sequence[str], normalize: bool) -> Tensor:
    """log p_LLM(text + EOS | BOS) [R] fp32 of this rank's texts; texts gathered over the TP group first (every
    rank of a tensor-parallel LLM must feed it identical inputs)."""
    all_texts, mine = gather_objects(list(texts))
    if not all_texts:
        return torch.zeros(0)
    return host.score(all_texts, normalize=normalize, add_eos=True).float()[mine].cpu()


@dataclass
class ScoredNBest:
    """N-best of a batch with its scores: texts [B][N] ('' where not valid), valid [B, N] bool, acoustic [B, N]
    (log p_CTC, -inf where not valid), llm [B, N] (0 where not valid); all on the CPU."""

    texts: List[List[str]]
    valid: Tensor
    acoustic: Tensor
    llm: Tensor

    def best(self, lm_weight: float) -> Tensor:
        """Index of argmax_n a_n + λ·l_n per utterance [B]."""
        return (self.acoustic + lm_weight * self.llm).argmax(1)


def score_nbest(
    log_probs: Tensor,
    lengths: Tensor,
    tokenizer,
    host,
    nbest: int,
    length_normalize: bool = False,
    llm_cache: Optional[Dict[str, float]] = None,
) -> ScoredNBest:
    """The N-best of CTC log-probs [B, T, V+1] (blank last) with acoustic and LLM scores. ``llm_cache`` (text ->
    score) spares the LLM texts it has already scored."""
    cache = {} if llm_cache is None else llm_cache
    nb = ctc_prefix_beam_search(log_probs, lengths, beam_size=nbest, nbest=nbest)  # ids [B, N, L]
    valid = nb.valid.cpu()  # [B, N]
    ids, lens = nb.ids.tolist(), nb.lengths.tolist()
    texts = [
        [tokenizer.ids_to_text(ids[b][n][: lens[b][n]]) if valid[b, n] else "" for n in range(nbest)]
        for b in range(len(ids))
    ]
    missing = sorted({t for row in texts for t in row} - set(cache))
    if missing:
        cache.update(zip(missing, llm_log_likelihood(host, missing, length_normalize).tolist()))
    llm = torch.tensor([[cache[t] for t in row] for row in texts]).view(len(texts), nbest)  # [B, N]
    acoustic = nb.scores.cpu().masked_fill(~valid, float("-inf"))  # [B, N]
    return ScoredNBest(texts, valid, acoustic, llm.masked_fill(~valid, 0.0))


def audio_batches(manifest: str, batch_size: int) -> Iterator[Tuple[Tensor, Tensor, List[dict]]]:
    """(signal [B, S], lengths [B], manifest entries) per batch of the manifest, in order."""
    import soundfile as sf

    entries = read_manifest(manifest)
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        audio = [
            torch.tensor(sf.read(resolve_audio_path(e["audio_filepath"], manifest), dtype="float32")[0]) for e in chunk
        ]
        lens = torch.tensor([len(a) for a in audio])
        signal = torch.zeros(len(audio), int(lens.max()))
        for i, a in enumerate(audio):
            signal[i, : len(a)] = a
        yield signal, lens, chunk


def check_rescoring(nbest, lm_weight) -> None:
    """Clear errors for the two settings (named as scripts/evaluate.py's options)."""
    if isinstance(nbest, bool) or not isinstance(nbest, int) or nbest < 1:
        raise ValueError(f"--nbest must be an integer >= 1, got {nbest!r}")
    if (
        isinstance(lm_weight, bool)
        or not isinstance(lm_weight, (int, float))
        or not lm_weight == lm_weight
        or abs(lm_weight) == float("inf")
    ):
        raise ValueError(f"--llm-weight must be a finite number, got {lm_weight!r}")


@torch.no_grad()
def rescore_manifest(
    model,
    host,
    manifest: str,
    nbest: int = 8,
    lm_weight: float = 0.5,
    length_normalize: bool = False,
    batch_size: int = 16,
) -> List[str]:
    """The LLM-rescored transcript of every utterance of ``manifest``, in manifest order."""
    check_rescoring(nbest, lm_weight)
    model.eval()
    device = next(model.parameters()).device
    cache: Dict[str, float] = {}
    out: List[str] = []
    for signal, lens, _ in audio_batches(manifest, batch_size):
        log_probs, enc_len, _ = model.forward(input_signal=signal.to(device), input_signal_length=lens.to(device))
        scored = score_nbest(log_probs, enc_len, model.tokenizer, host, nbest, length_normalize, cache)
        out += [scored.texts[b][n] for b, n in enumerate(scored.best(lm_weight).tolist())]
    return out
