"""The text and window length of the tiny datastore fixture (`retrieval_bundle` in conftest.py)."""

from __future__ import annotations

import numpy as np

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles. ") * 3
SEQ = 32


def text_ids(tokenizer_json: str, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    return np.asarray(Tokenizer.from_str(tokenizer_json).encode(text).ids, dtype=np.int64)
