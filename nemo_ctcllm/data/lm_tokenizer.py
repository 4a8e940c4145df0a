"""Byte-level BPE tokenizers for small language models trained here (the MLM of ``scripts/train_mlm.py``).

Byte-level BPE (GPT-2 style, ``Ġ`` marks a leading space) tokenizes any string, so every SentencePiece piece of
the ASR tokenizer has a clean tokenization (``▁the`` -> `` the`` -> ``Ġthe``, word-internal ``ing`` -> ``ing``):
the bridge of :mod:`nemo_ctcllm.objectives.bridge` then maps each ASR piece to the LM's own tokens. Texts are
tokenized with a leading space (``add_prefix_space``) so that a sentence's first word is spelled like every
other word, as it is by the ASR tokenizer (``▁`` on every word-initial piece): callers prepend the space
(:func:`lm_text`), the tokenizer itself adds none, so that a word-internal ASR piece tokenized on its own stays
word-internal.
"""
from __future__ import annotations

from typing import Iterable

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ``vocab_size`` entries) trained on ``texts``.

    Ids 0..4 are ``<pad> <s> </s> <unk> <mask>``; ``<s>``/``</s>`` double as BERT's CLS/SEP.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(SPECIALS.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def lm_text(text: str) -> str:
    """The form in which a sentence is given to these tokenizers: with one leading space."""
    return " " + text.strip()
