"""A small masked LM trained here (``scripts/train_mlm.py``, the ``mlm`` objective's default): its tokenizer
(byte-level BPE, or the ASR tokenizer's own pieces), the BERT it is, the masking that trains and evaluates it.

Byte-level BPE (GPT-2 style, ``Ġ`` marks a leading space) tokenizes any string, so every SentencePiece piece of
the ASR tokenizer has a clean tokenization (``▁the`` -> `` the`` -> ``Ġthe``, word-internal ``ing`` -> ``ing``):
the bridge of :mod:`nemo_ctcllm.objectives.shared.bridge` then maps each ASR piece to the LM's own tokens. Texts are
tokenized with a leading space (``add_prefix_space``) so that a sentence's first word is spelled like every
other word, as it is by the ASR tokenizer (``▁`` on every word-initial piece): callers prepend the space
(:func:`lm_text`), the tokenizer itself adds none, so that a word-internal ASR piece tokenized on its own stays
word-internal.
"""

from __future__ import annotations

from typing import Iterable

SPECIALS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "cls_token": "<s>",
    "sep_token": "</s>",
}


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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def lm_text(text: str) -> str:
    """The form in which a sentence is given to these tokenizers: with one leading space."""
    return " " + text.strip()


# ---------------------------------------------------------------------------------------------- a small BERT-MLM
def read_sentences(path) -> list:
    """The non-empty, non-comment lines of a sentence file (e.g. the shipped ``sentences.txt``)."""
    with open(path, encoding="utf-8") as f:
        return [s.strip() for s in f if s.strip() and not s.startswith("#")]


def bert_mlm(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 2, max_len: int = 64):
    """A randomly initialised ``BertForMaskedLM`` sized for ``tokenizer`` (intermediate size 4 x hidden)."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_len,
        pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=1,
    )
    return BertForMaskedLM(cfg)


def encode(tokenizer, sentences, max_len: int, to_ids=None):
    """[CLS] tokens [SEP] ids per sentence (truncated to ``max_len``): right-padded ids [B, L] and lengths [B].

    ``to_ids(sentence) -> ids``: how a sentence becomes tokens (default: ``tokenizer`` on :func:`lm_text`).
    """
    import torch

    if to_ids is None:

        def to_ids(sentence):
            return tokenizer(lm_text(sentence), add_special_tokens=False)["input_ids"]

    rows = [to_ids(s)[: max_len - 2] for s in sentences]
    rows = [[tokenizer.cls_token_id, *r, tokenizer.sep_token_id] for r in rows]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def mask_tokens(ids, lengths, tokenizer, prob: float, generator, train: bool):
    """BERT masking of the positions between [CLS] and [SEP]: returns (input ids, labels with -100 elsewhere).

    ``train``: of the chosen positions 80 % become [MASK], 10 % a random token, 10 % stay (Devlin et al. 2019,
    arXiv 1810.04805); otherwise every chosen position becomes [MASK] (evaluation). At least one per sentence.
    """
    import torch

    B, L = ids.shape
    pos = torch.arange(L)[None]
    inner = (pos >= 1) & (pos < (lengths - 1)[:, None])  # [B, L]
    u = torch.rand(B, L, generator=generator)
    chosen = (u < prob) & inner
    chosen[torch.arange(B), u.masked_fill(~inner, 2.0).argmin(1)] = True
    labels = torch.where(chosen, ids, -100)
    inputs = ids.clone()
    how = torch.rand(B, L, generator=generator) if train else torch.zeros(B, L)
    inputs[chosen & (how < 0.8)] = tokenizer.mask_token_id
    rand = chosen & (how >= 0.8) & (how < 0.9)
    inputs[rand] = torch.randint(5, len(tokenizer), (int(rand.sum()),), generator=generator)
    return inputs, labels


# ---------------------------------------------------------------------------------------------- an MLM over ASR pieces
PIECE_OFFSET = 4  # <pad> <s> </s> <mask> come first; SentencePiece id i is MLM id i + 4 (its <unk> the MLM's unk)


def piece_tokenizer(sp_model_path: str):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the ASR tokenizer's SentencePiece pieces (+ specials).

    An MLM trained on these ids reads exactly the sequences the bridge gives it: every ASR piece is one MLM
    token (the bridge's piece map is then exact, no mean embedding, no foreign segmentation). Training text is
    encoded by the SentencePiece model itself (:func:`piece_ids`); this tokenizer only has to find each piece
    by its surface text (``▁the`` read as `` the``), which a Unigram model over the pieces (equal scores: fewest
    pieces wins) with a ``▁`` Metaspace pre-tokenizer that adds no prefix does exactly.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    if not sp.is_unknown(0):
        raise ValueError(f"{sp_model_path}: expected the unknown piece at id 0 (NeMo's SentencePiece layout)")
    vocab = [("<pad>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("<mask>", 0.0)]
    # every piece scores -1: Viterbi then picks the fewest pieces, so a piece's own text is that one piece
    vocab += [(sp.id_to_piece(i), -1.0) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=PIECE_OFFSET))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        unk_token=sp.id_to_piece(0),
    )


def piece_ids(sp_model_path: str):
    """sentence -> MLM ids of its ASR pieces (the SentencePiece model's own segmentation)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    return lambda sentence: [i + PIECE_OFFSET for i in sp.encode(sentence)]
