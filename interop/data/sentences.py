"""Sentence splitting for ``interop data preprocess --split-sentences`` (BERT/T5 datasets sample sentence pairs).

Megatron-LM uses NLTK punkt, whose model is a separate download that cannot be fetched here. ``sentencex``
(MIT, Wikimedia; rule-based, ~300 languages) ships its rules inside the wheel, so splitting works offline. It is an
optional extra (``pip install 'megatron-interop[sentences]'``); without it the flag is a one-line error.
"""
from __future__ import annotations

from typing import Callable

from formats.errors import InteropError


def sentence_splitter(language: str = "en") -> Callable[[str], list[str]]:
    """``text -> [sentence, ...]`` (stripped, empty ones dropped; a text without sentences gives ``[]``)."""
    try:
        from sentencex import segment
    except ImportError:
        raise InteropError("--split-sentences needs the 'sentencex' package (pip install sentencex, or the "
                           "'sentences' extra of megatron-interop); nothing is downloaded at run time") from None

    def split(text: str) -> list[str]:
        return [s.strip() for s in segment(language, text) if s.strip()]

    return split
