#!/usr/bin/env python3
"""Regenerate ``demo/sentences.txt`` from WordNet's gloss example sentences.

Source: the Debian package ``wordnet-base`` (WordNet 3.0, Princeton University), files
``/usr/share/wordnet/data.{adj,adv,noun,verb}``. Every synset line ends with a gloss
(``| definition; "example one"; "example two"``); the double-quoted strings are usage
examples written by the WordNet lexicographers. Licence: WordNet 3.0 licence, see
``demo/LICENSE.wordnet`` (copied from /usr/share/doc/wordnet-base/copyright).

Cleaning (a sentence is dropped rather than mangled when it does not fit):
  * kept punctuation is only ``. , ; : ! ?`` (removed on normalisation) and ``-`` (becomes a
    space); anything else (digits, ``$ % & / ( ) ` `` ...) drops the sentence;
  * apostrophes only inside a word (``don't``, ``mother's``) or after a final ``s``
    (``the students' books``); single quotes used as quotation marks drop the sentence;
  * no abbreviations (a period that does not end the sentence) and no all-capitals words of
    two or more letters (acronyms, Roman numerals), because TTS engines expand/spell them
    and the transcript would no longer match the audio;
  * 3..20 words after normalisation; ASCII letters only;
  * deduplicated on the normalised text (first occurrence wins), in file order
    (data.adj, data.adv, data.noun, data.verb, line order inside each file).

The original casing/punctuation is kept in the file (it gives the TTS engines better prosody);
``demo.corpus.normalize_text`` turns a line into the transcript.

Usage::

    python -m demo.extract_wordnet_sentences [--wordnet-dir /usr/share/wordnet] \
        [--out demo/sentences.txt]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HEADER = (
    "# Example sentences from the glosses of WordNet 3.0 (Princeton University), taken from the\n"
    "# Debian package wordnet-base (/usr/share/wordnet/data.*) by demo/extract_wordnet_sentences.py.\n"
    "# Licence: WordNet 3.0 licence, see LICENSE.wordnet in this directory.\n"
    "# WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.\n"
    "# One sentence per line; lines starting with '#' are comments.\n"
)

POS_FILES = ("data.adj", "data.adv", "data.noun", "data.verb")
QUOTE_RE = re.compile(r'"([^"]*)"')
ALLOWED_CHARS_RE = re.compile(r"^[A-Za-z' ,.;:!?\-]+$")
WORD_RE = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)*(?:(?<=[sS])')?$")
MIN_WORDS, MAX_WORDS = 3, 20


def normalize(sentence: str) -> str:
    """Same rule as demo.corpus.normalize_text (kept standalone so this script has no deps)."""
    s = sentence.lower().replace("-", " ")
    s = re.sub(r"[.,;:!?]", " ", s)
    return " ".join(s.split())


def clean(example: str) -> str | None:
    """Return the cleaned sentence (original casing/punctuation, whitespace collapsed) or None."""
    s = " ".join(example.split())
    if not s or not ALLOWED_CHARS_RE.match(s):
        return None
    # a period anywhere but at the very end (abbreviations such as "Mr." or "U.S.", ellipses)
    if "." in s.rstrip(".!?"):
        return None
    if ".." in s:
        return None
    words = re.sub(r"[.,;:!?]", " ", s.replace("-", " ")).split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return None
    for w in words:
        if not WORD_RE.match(w):
            return None
        letters = w.replace("'", "")
        if len(letters) >= 2 and letters.isupper():
            return None
    # leading punctuation / dangling hyphens look odd when spoken
    if not s[0].isalpha():
        return None
    return s


def extract(wordnet_dir: str) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for name in POS_FILES:
        path = os.path.join(wordnet_dir, name)
        with open(path, encoding="latin-1") as f:  # WordNet data files are ASCII (+ a few latin-1 bytes)
            for line in f:
                if not line[:1].isdigit() or " | " not in line:
                    continue  # licence header lines start with two spaces
                gloss = line.split(" | ", 1)[1]
                for example in QUOTE_RE.findall(gloss):
                    s = clean(example)
                    if s is None:
                        continue
                    key = normalize(s)
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(s)
    return out


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "sentences.txt")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--wordnet-dir",
        default="/usr/share/wordnet",
        help="directory with WordNet data.* files (Debian package wordnet-base)",
    )
    p.add_argument("--out", default=os.path.normpath(default_out))
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.wordnet_dir, "data.noun")):
        print(
            f"error: {args.wordnet_dir}/data.noun not found; install it with `apt-get install wordnet-base`",
            file=sys.stderr,
        )
        return 1
    sentences = extract(args.wordnet_dir)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(HEADER)
        for s in sentences:
            f.write(s + "\n")
    print(f"wrote {len(sentences)} sentences to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
