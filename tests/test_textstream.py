"""TextStreamer: token-by-token output of a byte-level BPE is exact and never splits a char."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from itera_runtime.textstream import TextStreamer, bytes_to_unicode

MULTIBYTE = "café — naïve ☃ 日本語 🙂"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "State space models carry a fixed-size state from token to token.",
    f"Plain ASCII, then {MULTIBYTE}, then ASCII again.",
    "Mixture of experts routes each token to a few small feed-forward networks.",
] * 4


def byte_level_bpe(vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe300():
    return byte_level_bpe(300)


def test_byte_table_matches_tokenizers():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ"  # the well-known GPT-2 space marker


def test_streamed_text_equals_original(bpe300):
    text = f"Hello {MULTIBYTE}! More ASCII: fox and dog. {MULTIBYTE}{MULTIBYTE} end 🙂🙂"
    ids = bpe300.encode(text).ids
    assert bpe300.get_vocab_size() > 256  # merges were learned
    streamer = TextStreamer(bpe300)
    chunks = [streamer.push(i) for i in ids]
    tail = streamer.flush()
    assert "".join(chunks) + tail == text
    assert tail == ""
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == bpe300.decode(ids)
    # Some token really did split a character, or the test proves nothing.
    assert any(c == "" for c in chunks)


def test_emoji_split_across_four_byte_tokens():
    tok = byte_level_bpe(256)  # 256 byte tokens + the special token, no merges
    ids = tok.encode("🙂").ids
    assert len(ids) == 4
    streamer = TextStreamer(tok)
    assert [streamer.push(i) for i in ids] == ["", "", "", "🙂"]
    assert streamer.flush() == ""


def test_flush_replaces_incomplete_tail():
    tok = byte_level_bpe(256)
    ids = tok.encode("a🙂").ids
    streamer = TextStreamer(tok)
    out = "".join(streamer.push(i) for i in ids[:3])  # "a" and 2 of the emoji's 4 bytes
    assert out == "a"
    assert streamer.flush() == "\ufffd"
    # flushed state is reset: the streamer is reusable
    assert "".join(streamer.push(i) for i in ids) + streamer.flush() == "a🙂"


def test_special_tokens_produce_no_text(bpe300):
    eos = bpe300.token_to_id("<|endoftext|>")
    streamer = TextStreamer(bpe300)
    ids = bpe300.encode("fox").ids
    assert "".join(streamer.push(i) for i in [*ids, eos]) == "fox"
    assert streamer.decode_bytes([*ids, eos]) == b"fox"


def test_decode_bytes_and_bad_id(bpe300):
    ids = bpe300.encode(MULTIBYTE).ids
    streamer = TextStreamer(bpe300)
    assert streamer.decode_bytes(ids) == MULTIBYTE.encode("utf-8")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        streamer.push(bpe300.get_vocab_size() + 5)


def test_non_byte_level_tokenizer_is_refused():
    tok = Tokenizer(models.WordLevel({"日本": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="ByteLevel"):
        TextStreamer(tok)
