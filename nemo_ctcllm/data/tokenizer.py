"""SentencePiece BPE tokenizer from NeMo manifests, in NeMo's tokenizer folder layout.

The folder ``<out>/tokenizer_spe_bpe_v<N>/`` holds ``tokenizer.model``, ``tokenizer.vocab`` and
``vocab.txt`` (what ``model.tokenizer.dir`` with ``type: bpe`` expects), as NeMo's
``process_asr_text_tokenizer.py`` writes it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, List

from nemo_ctcllm.data.manifest import read_manifest


def build_bpe_tokenizer(manifests: Iterable[str], out_dir: str, vocab_size: int, force: bool = False) -> str:
    """Train SentencePiece BPE on the ``text`` of every manifest line; returns the tokenizer folder."""
    manifests = list(manifests)
    texts: List[str] = []
    for manifest in manifests:
        texts += [e["text"] for e in read_manifest(manifest) if e.get("text")]
    if not texts:
        raise ValueError(f"no transcripts found in {manifests}")
    return build_bpe_tokenizer_from_texts(texts, out_dir, vocab_size, force=force)


def build_bpe_tokenizer_from_texts(texts: List[str], out_dir: str, vocab_size: int, force: bool = False) -> str:
    """Train SentencePiece BPE on ``texts``; returns ``<out_dir>/tokenizer_spe_bpe_v<vocab_size>``.

    An existing tokenizer is kept only if it was trained on the same texts (``texts.sha256`` in the folder):
    a tokenizer left from a different corpus is retrained, not silently reused."""
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model
    from nemo.utils import logging

    folder = Path(out_dir) / f"tokenizer_spe_bpe_v{vocab_size}"
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    stamp = folder / "texts.sha256"
    if (folder / "tokenizer.model").exists() and not force:
        if stamp.exists() and stamp.read_text().strip() == digest:
            return str(folder)
        logging.info(f"{folder}: trained on other texts (or unstamped): training it again")
    if folder.exists():  # NeMo's create_spt_model keeps an existing tokenizer.model
        for name in ("tokenizer.model", "tokenizer.vocab", "vocab.txt", stamp.name):
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "text_corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    create_spt_model(
        str(corpus),
        vocab_size,
        sample_size=-1,
        do_lower_case=False,
        tokenizer_type="bpe",
        output_dir=str(folder),
        remove_extra_whitespaces=True,
    )
    os.remove(corpus)
    stamp.write_text(digest + "\n")
    return str(folder)
