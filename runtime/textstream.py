"""Incremental detokenisation for byte-level BPE that never emits broken UTF-8.

A byte-level BPE token is a run of raw bytes, and one character (é, ☃, 🙂) can be split
across several tokens. Decoding each token on its own would print U+FFFD for the halves;
re-decoding the whole output every step would cost O(n) per token. `TextStreamer` maps each
id to its bytes once and feeds them to an incremental UTF-8 decoder, which returns exactly
the characters that are complete and keeps at most three pending bytes.

Not tokenizers' `decoders.DecodeStream` (0.21+): it has no flush, so a generation that ends
inside a character loses its tail (on random ids from the golden tokenizer, 478 of 1000
streams ended other than `Tokenizer.decode`), and it holds complete characters back a token
(" —" as one piece where this gives " ", "—"). The byte table is also what bits/byte counts.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TextStreamer", "bytes_to_unicode", "token_byte_lengths"]


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by ByteLevel pre-tokenizers.

    `tokenizers` applies this table when it builds the vocab but does not expose its
    inverse, so we rebuild it: printable Latin-1 bytes map to themselves and the other 68
    bytes (controls, space, soft hyphen...) are shifted to U+0100 onwards, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


class TextStreamer:
    """Turns a stream of token ids into a stream of complete text chunks.

    Special tokens (those the tokenizer marks special, like "<|endoftext|>") produce no
    text, as in `Tokenizer.decode(..., skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        table: list[bytes] = [b""] * (max(vocab.values()) + 1 if vocab else 0)
        for token, idx in vocab.items():
            if idx in added:
                # Added tokens are stored as plain text, not through the byte table.
                table[idx] = b"" if added[idx].special else token.encode("utf-8")
                continue
            try:
                table[idx] = bytes(char_to_byte[c] for c in token)
            except KeyError:
                raise ValueError(
                    f"token {token!r} (id {idx}) is not byte-level: "
                    "TextStreamer needs a ByteLevel BPE tokenizer"
                ) from None
        self._bytes = table
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (b"" for special tokens)."""
        if not 0 <= token_id < len(self._bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {len(self._bytes)})")
        return self._bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated raw bytes of `ids`, before any UTF-8 decoding."""
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", never a split character)."""
        return self._decoder.decode(self.token_bytes(int(token_id)), final=False)

    def flush(self) -> str:
        """Return any pending bytes as text (U+FFFD for an incomplete tail) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id, so bits/byte is exact on any slice of text.

    The one definition of a token's bytes for bits per byte, in training's evaluation and
    in `itera-bench quality` alike.
    """
    import numpy as np

    streamer = TextStreamer(tokenizer)
    return np.array([len(streamer.token_bytes(i)) for i in range(tokenizer.get_vocab_size())], dtype=np.int64)
