#!/usr/bin/env python
"""N-best throughput: the batched CTC prefix beam search vs per-utterance pyctcdecode, same posteriors, one run.

Both decoders get the same log-posteriors [B, T, V+1] (blank last) and the same beam width; the batched search
decodes the whole batch at once, pyctcdecode one utterance at a time (its normal use; no LM). Runs are
interleaved round-robin; the script prints the median hypotheses/s of each and their ratio.

Posteriors: synthetic by default (sharpened random logits, so that beams are not degenerate), or real ones
from a trained model on a manifest (``--nemo model.nemo --manifest dev.json``).

    python -m benchmarks.bench_nbest --batch 16 --frames 200 --vocab 128 --beam 8 --nbest 8 --repeats 5
    python -m benchmarks.bench_nbest --nemo exp/model.nemo --manifest demo_data/dev_manifest.json --batch 16

pyctcdecode is not a dependency of the project: it pins numpy<2, which NeMo's stack does not need, so install it
without its dependencies (it runs on numpy 2):  pip install --no-deps pyctcdecode==0.5.0 pygtrie
"""

import argparse
import json
import os
import statistics
import time

import torch


def synthetic_posteriors(batch, frames, vocab, seed=0, sharpness=4.0):
    """log-posteriors [B, T, V+1] (blank last) and lengths [B] (between 60% and 100% of ``frames``)."""
    g = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(batch, frames, vocab + 1, generator=g)
    logits[..., -1] += 2.0  # blank dominates, as in a trained CTC model
    lengths = torch.randint(int(0.6 * frames), frames + 1, (batch,), generator=g)
    lengths[0] = frames
    return logits.log_softmax(-1), lengths


def model_posteriors(nemo_path, manifest, batch):
    """log-posteriors of the first ``batch`` utterances of a manifest under a .nemo model, and the labels."""
    from nemo.collections.asr.models import ASRModel

    import nemo_ctcllm  # noqa: F401
    from nemo_ctcllm.data.manifest import read_manifest, resolve_audio_path

    model = ASRModel.restore_from(nemo_path, map_location="cpu").eval()
    import soundfile as sf

    entries = read_manifest(manifest)[:batch]
    audio = [
        torch.tensor(sf.read(resolve_audio_path(e["audio_filepath"], manifest), dtype="float32")[0]) for e in entries
    ]
    lens = torch.tensor([len(a) for a in audio])
    signal = torch.zeros(len(audio), int(lens.max()))
    for i, a in enumerate(audio):
        signal[i, : len(a)] = a
    with torch.no_grad():
        log_probs, enc_len, _ = model.forward(input_signal=signal, input_signal_length=lens)
    vocab = model.tokenizer.vocab_size
    labels = [model.tokenizer.ids_to_tokens([i])[0] for i in range(vocab)]
    return log_probs, enc_len, labels


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=200, help="synthetic: frames per utterance (after subsampling)")
    p.add_argument("--vocab", type=int, default=128, help="synthetic: labels without the blank")
    p.add_argument("--beam", type=int, default=8)
    p.add_argument("--nbest", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="device of the batched search (pyctcdecode is CPU-only)")
    p.add_argument("--nemo", default=None)
    p.add_argument("--manifest", default=None)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()

    from pyctcdecode import build_ctcdecoder

    from nemo_ctcllm.decoding import ctc_prefix_beam_search

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    if args.nemo:
        log_probs, lengths, labels = model_posteriors(args.nemo, args.manifest, args.batch)
    else:
        log_probs, lengths = synthetic_posteriors(args.batch, args.frames, args.vocab)
        labels = [f"▁w{i}" for i in range(args.vocab)]  # word-initial BPE-style pieces
    decoder = build_ctcdecoder(labels + [""])  # blank last, as in NeMo
    utterances = [log_probs[b, : int(n)].numpy() for b, n in enumerate(lengths)]
    device = torch.device(args.device)
    lp_dev, len_dev = log_probs.to(device), lengths.to(device)

    def ours():
        nb = ctc_prefix_beam_search(lp_dev, len_dev, args.beam, args.nbest)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return int(nb.valid.sum())

    def theirs():
        return sum(min(args.nbest, len(decoder.decode_beams(u, beam_width=args.beam))) for u in utterances)

    runs = {"batched_prefix_beam": ours, "pyctcdecode_per_utterance": theirs}
    for fn in runs.values():  # warm-up
        fn()
    rates = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            hyps = fn()
            rates[name].append(hyps / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    ratio = med["batched_prefix_beam"] / med["pyctcdecode_per_utterance"]
    T = int(log_probs.shape[1])
    print(
        f"posteriors: {'model' if args.nemo else 'synthetic'} B={log_probs.shape[0]} T<={T} "
        f"V+1={log_probs.shape[2]}; beam {args.beam}, nbest {args.nbest}; batched search on {device}"
    )
    for name, r in med.items():
        print(f"{name:<28} {r:>12.1f} hypotheses/s")
    print(f"ratio (batched / pyctcdecode): {ratio:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "hyps_per_s": med, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
