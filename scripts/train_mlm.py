#!/usr/bin/env python
"""Train the small BERT masked LM that the ``mlm`` objective uses by default, on the shipped text corpus.

No PyPI package ships a BERT with its masked-LM head, so the demo makes one: a byte-level BPE tokenizer
(``tokenizers``), or with ``--asr-tokenizer`` the ASR model's own SentencePiece pieces (recommended: the
bridge then maps every ASR piece to exactly one MLM token, and the MLM has read text segmented the way the CTC
head segments it), and a small ``BertForMaskedLM`` from a config (``transformers``), trained with BERT's masking
(15 %; 80/10/10) on WordNet's example sentences (``demo/sentences.txt``), minus a held-out test
split of distinct sentences. It reports the masked-token accuracy on the test split (every chosen position
masked) against the unigram baseline (always predict the training corpus' most frequent token), and the
cross-entropy against the unigram distribution's, and writes a Hugging Face folder (model + tokenizer +
``mlm_eval.json``) that ``model.objectives.mlm.model_dir`` accepts, like any ``AutoModelForMaskedLM`` folder.

    python scripts/train_mlm.py --out artifacts/mlm/bert-mlm-wordnet \
        --asr-tokenizer artifacts/tokenizers/tokenizer_spe_bpe_v128           # a few minutes on 2 CPU cores
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nemo_ctcllm.data.small_lm import (  # noqa: E402
    bert_mlm,
    encode,
    mask_tokens,
    piece_ids,
    piece_tokenizer,
    read_sentences,
    train_byte_level_bpe,
)


@torch.no_grad()
def evaluate(model, tokenizer, sentences, max_len, unigram_logp, to_ids=None, batch=256, seed=1):
    """Masked-token accuracy and cross-entropy of the MLM and of the unigram baseline on fixed masks."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    hits = base_hits = n = 0
    ce = base_ce = 0.0
    for i in range(0, len(sentences), batch):
        ids, lengths = encode(tokenizer, sentences[i : i + batch], max_len, to_ids)
        inputs, labels = mask_tokens(ids, lengths, tokenizer, 0.15, g, train=False)
        attn = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        logits = model(input_ids=inputs, attention_mask=attn).logits  # [B, L, V]
        sel = labels != -100
        target = labels[sel]  # [M]
        logp = logits[sel].log_softmax(-1)  # [M, V]
        hits += int((logp.argmax(-1) == target).sum())
        ce -= float(logp.gather(1, target[:, None]).sum())
        base_hits += int((target == unigram_logp.argmax()).sum())
        base_ce -= float(unigram_logp[target].sum())
        n += int(sel.sum())
    model.train()
    return {
        "masked_tokens": n,
        "mlm_accuracy": hits / n,
        "unigram_accuracy": base_hits / n,
        "mlm_ce": ce / n,
        "unigram_ce": base_ce / n,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    p.add_argument("--corpus", default=os.path.join(REPO, "demo", "sentences.txt"))
    p.add_argument(
        "--asr-tokenizer",
        default=None,
        help="NeMo SentencePiece tokenizer folder (or .model): the MLM's vocabulary is then exactly the "
        "ASR pieces, so the mlm objective's bridge maps each piece to one MLM token (recommended: "
        "the tokenizer of the ASR model it will train)",
    )
    p.add_argument("--vocab-size", type=int, default=1000, help="byte-level BPE size (without --asr-tokenizer)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=128, help="positions, [CLS] and [SEP] included")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop training after this wall time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    sentences = sorted(set(read_sentences(args.corpus)))
    random.Random(args.seed).shuffle(sentences)
    n_test = max(1, int(len(sentences) * args.test_fraction))
    test, train = sentences[:n_test], sentences[n_test:]
    to_ids = None
    if args.asr_tokenizer:
        sp_model = args.asr_tokenizer
        if os.path.isdir(sp_model):
            sp_model = os.path.join(sp_model, "tokenizer.model")
        tokenizer, to_ids = piece_tokenizer(sp_model), piece_ids(sp_model)
    else:
        tokenizer = train_byte_level_bpe(train, args.vocab_size)  # it never sees the test split either
    model = bert_mlm(tokenizer, args.hidden, args.layers, args.heads, args.max_len)

    counts = torch.zeros(len(tokenizer))
    for i in range(0, len(train), 1024):
        ids, lengths = encode(tokenizer, train[i : i + 1024], args.max_len, to_ids)
        inner = (torch.arange(ids.shape[1])[None] >= 1) & (torch.arange(ids.shape[1])[None] < (lengths - 1)[:, None])
        counts += torch.bincount(ids[inner], minlength=len(tokenizer)).float()
    unigram_logp = ((counts + 1) / (counts + 1).sum()).log()  # add-one smoothed

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.05, 1 - s / args.steps)
    )
    g = torch.Generator().manual_seed(args.seed)
    start, step = time.time(), 0
    model.train()
    while step < args.steps and time.time() - start < 60 * args.max_minutes:
        idx = torch.randint(len(train), (args.batch,), generator=g).tolist()
        ids, lengths = encode(tokenizer, [train[i] for i in idx], args.max_len, to_ids)
        inputs, labels = mask_tokens(ids, lengths, tokenizer, 0.15, g, train=True)
        attn = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        hidden = model.bert(input_ids=inputs, attention_mask=attn).last_hidden_state  # [B, L, H]
        sel = labels != -100  # the MLM head only where there is a target (~15 %: most of the output layer's cost)
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[sel]), labels[sel])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step}  loss {loss.item():.3f}  {time.time() - start:.0f} s", flush=True)

    metrics = evaluate(model, tokenizer, test, args.max_len, unigram_logp, to_ids)
    metrics.update(
        {
            "train_sentences": len(train),
            "test_sentences": len(test),
            "steps": step,
            "train_minutes": (time.time() - start) / 60,
            "vocab_size": len(tokenizer),
            "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
            "args": vars(args),
        }
    )
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    with open(os.path.join(args.out, "mlm_eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps({k: v for k, v in metrics.items() if k != "args"}, indent=2))
    print(
        f"held-out masked-token accuracy {metrics['mlm_accuracy']:.3f} vs unigram {metrics['unigram_accuracy']:.3f}; "
        f"cross-entropy {metrics['mlm_ce']:.2f} vs {metrics['unigram_ce']:.2f} nats "
        f"(perplexity {math.exp(metrics['mlm_ce']):.0f} vs {math.exp(metrics['unigram_ce']):.0f})"
    )


if __name__ == "__main__":
    main()
