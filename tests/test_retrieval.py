"""kNN-LM retrieval: datastore build (torch), bundle round-trip with hashes, torch-free search and mix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from itera_runtime.bundle import BundleError, load_bundle
from itera_runtime.retrieval import Datastore, MixSettings, Retriever, knn_log_mix, open_retriever
from retrieval_data import SEQ, TEXT

# ------------------------------------------------------------------ torch-free maths


def _reference_mix(logits, keys, values, query, k, lam, temperature, metric):
    """The kNN-LM formula written out position by position, in plain Python loops."""
    if metric == "l2":
        scores = [-sum((q - c) ** 2 for q, c in zip(query, key)) for key in keys]
    else:
        scores = [sum(q * c for q, c in zip(query, key)) for key in keys]
    top = sorted(range(len(keys)), key=lambda i: -scores[i])[:k]
    z = sum(np.exp(scores[i] / temperature) for i in top)
    p_knn = np.zeros(len(logits))
    for i in top:
        p_knn[values[i]] += np.exp(scores[i] / temperature) / z
    p_model = np.exp(logits - logits.max())
    p_model /= p_model.sum()
    return np.log(lam * p_knn + (1 - lam) * p_model)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_mix_equals_reference_on_crafted_inputs(metric):
    rng = np.random.default_rng(0)
    V, D, N, k = 11, 5, 40, 6
    keys = rng.standard_normal((N, D)).astype(np.float32)
    values = rng.integers(0, 4, N)  # few distinct values: neighbours share tokens and must add up
    queries = rng.standard_normal((7, D)).astype(np.float32)
    logits = rng.standard_normal((7, V)).astype(np.float32) * 3
    settings = MixSettings(k=k, lam=0.3, temperature=2.0)
    got = Retriever(Datastore(keys, values, metric), settings)(logits, queries)
    want = np.stack([_reference_mix(logits[i].astype(np.float64), keys.astype(np.float64), values,
                                    queries[i].astype(np.float64), k, 0.3, 2.0, metric) for i in range(7)])
    np.testing.assert_allclose(got, want, atol=2e-5)
    # A normalised distribution per row, as the sampler and the scorer expect.
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(1), 1.0, atol=1e-5)


def test_search_is_exact_across_blocks(monkeypatch):
    """Blocked search with a running top-k returns the brute-force neighbours, best first."""
    import itera_runtime.retrieval as r

    monkeypatch.setattr(r, "_BLOCK_ELEMENTS", 64)  # many blocks of a few keys each
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((500, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    scores, idx = Datastore(keys, np.zeros(500, np.int64), "l2").search(q, 10)
    d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :10])
    np.testing.assert_allclose(-scores, np.sort(d, axis=1)[:, :10], rtol=1e-4, atol=1e-4)


def test_lambda_zero_is_the_model_alone():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4, 9))
    got = knn_log_mix(logits, np.zeros((4, 2)), np.zeros((4, 2), np.int64), MixSettings(2, 0.0, 1.0))
    x = logits - logits.max(1, keepdims=True)
    np.testing.assert_allclose(got, x - np.log(np.exp(x).sum(1, keepdims=True)), atol=1e-6)


@pytest.mark.parametrize("bad", [dict(k=0), dict(lam=1.0), dict(lam=-0.1), dict(temperature=0.0)])
def test_bad_mix_settings_refused(bad):
    with pytest.raises(ValueError):
        MixSettings(**{"k": 4, "lam": 0.2, "temperature": 1.0, **bad})


# ------------------------------------------------------------- datastore in a bundle

# The datastore fixture is `retrieval_bundle` in conftest.py, over retrieval_data.TEXT.


def test_datastore_holds_every_window_position(retrieval_bundle):
    store, bundle, ids = retrieval_bundle
    meta = json.loads((store / "datastore.json").read_text())
    n = (len(ids) - 1) // SEQ * SEQ
    assert meta["n_entries"] == n
    values = np.load(store / "values.npy", allow_pickle=False)
    np.testing.assert_array_equal(values, ids[1:n + 1])  # windows taken in order when all are used
    spec = load_bundle(bundle).manifest.retrieval
    assert (spec.n_entries, spec.dim, spec.key_dtype) == (n, 128, "float16")
    assert spec.source["tuning"]["split"] == "val"


def test_retrieval_moves_predictions_to_the_stored_next_token(retrieval_bundle):
    """Exact-match case: on text that is in the datastore, the mixed distribution puts more
    probability on the token that followed there than the model alone does."""
    from itera_runtime.session import ModelSession

    _, path, ids = retrieval_bundle
    b = load_bundle(path)
    window = ids[:SEQ + 1]  # the first stored window, run from a fresh state as it was stored
    plain, _ = next(ModelSession(b, threads=1).forward_chunks(window[:-1]))
    mixed, _ = next(ModelSession(b, threads=1, retriever=open_retriever(b, lam=0.5)).forward_chunks(window[:-1]))
    rows = np.arange(SEQ)
    logp_plain = plain - np.log(np.exp(plain - plain.max(1, keepdims=True)).sum(1, keepdims=True)) - plain.max(1, keepdims=True)
    gain = mixed[rows, window[1:]] - logp_plain[rows, window[1:]]
    assert (gain > 0).mean() > 0.9
    # Greedy prediction: the untrained model rarely guesses the next character; with retrieval it does.
    assert (mixed.argmax(1) == window[1:]).mean() > 0.9 > (plain.argmax(1) == window[1:]).mean()


def test_bundle_without_datastore_runs_as_before(tiny_itera, retrieval_bundle):
    """Same weights: the plain bundle has no hidden output and gives the logits the retrieval bundle's model gives."""
    from itera_runtime.session import ModelSession

    _, path, ids = retrieval_bundle
    plain = load_bundle(tiny_itera.bundle)
    assert plain.manifest.retrieval is None and plain.io.hidden is None
    with pytest.raises(BundleError, match="no retrieval datastore"):
        open_retriever(plain)
    a, _ = ModelSession(plain, threads=1).prefill(ids[:20])
    b, _ = ModelSession(load_bundle(path), threads=1).prefill(ids[:20])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_decode_with_retrieval_equals_prefill_with_retrieval(retrieval_bundle):
    """The decoder's bound hidden output and the prefill path mix the same way."""
    from itera_runtime.session import ModelSession

    _, path, ids = retrieval_bundle
    b = load_bundle(path)
    s = ModelSession(b, threads=1, retriever=open_retriever(b))
    rows, _ = next(s.forward_chunks(ids[:12]))
    _, state = s.prefill(ids[:6])
    dec = s.decoder(state)
    stepped = np.stack([np.array(dec.step(int(t))) for t in ids[6:12]])
    np.testing.assert_allclose(stepped, rows[6:12], atol=1e-4)


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_flipped_byte_in_datastore_refused_in_one_line(retrieval_bundle, tmp_path):
    import shutil

    _, path, _ = retrieval_bundle
    bad = tmp_path / "bundle"
    shutil.copytree(path, bad)
    keys = bad / "retrieval" / "keys.npy"
    data = bytearray(keys.read_bytes())
    data[-3] ^= 0x01
    keys.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="keys.npy: sha256 mismatch"):
        load_bundle(bad)
    r = _run("itera_runtime.cli", str(bad), "-p", "To be", "-n", "2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "sha256 mismatch" in r.stderr


def test_datastore_of_another_model_refused(retrieval_bundle, tiny_itera, tmp_path):
    """At export (other weights) and at run time (a manifest pointing at another model's store)."""
    import torch

    from itera_export.exporter import ExportError, export_checkpoint
    from itera_lite.checkpoint import load_checkpoint, save_checkpoint

    store, path, _ = retrieval_bundle
    ckpt = load_checkpoint(tiny_itera.checkpoint)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    other = tmp_path / "other.pt"
    save_checkpoint(other, {k: ckpt[k] for k in ("model_config", "model", "tokenizer_json")})
    with pytest.raises(ExportError, match="built from other weights"):
        export_checkpoint(other, tmp_path / "b", retrieval=store)
    assert not (tmp_path / "b").exists()

    from itera_runtime.bundle import Manifest, write_manifest
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(path, bad)
    m = load_bundle(bad).manifest
    m.source_checkpoint = {**m.source_checkpoint, "model_sha256": "0" * 64}
    write_manifest(bad, m)
    with pytest.raises(BundleError, match="built from another model"):
        open_retriever(load_bundle(bad))
    r = _run("itera_runtime.cli", str(bad), "-p", "To be", "-n", "2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "another model" in r.stderr
    del torch, Manifest


@pytest.mark.slow  # three CLI processes
def test_itera_run_and_bench_quality_with_retrieval(retrieval_bundle, tmp_path):
    _, path, _ = retrieval_bundle
    r = _run("itera_runtime.cli", str(path), "-p", "To be, or not", "-n", "8", "--temperature", "0", "--json",
             "--threads", "1")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["retrieval"]["n_entries"] > 0 and rec["retrieval"]["us_per_position"] > 0
    off = json.loads(_run("itera_runtime.cli", str(path), "-p", "To be, or not", "-n", "8", "--temperature", "0",
                          "--json", "--no-retrieval").stdout)
    assert off["retrieval"] is None
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    q = _run("itera_bench.cli", "quality", str(path), "--data", str(text), "--window", "32", "-o", "json",
             "--threads", "1")
    assert q.returncode == 0, q.stderr
    rows = {r["test"]: r for r in json.loads(q.stdout) if r["metric"] == "bits_per_byte"}
    assert set(rows) == {"t.txt:all", "t.txt:all+knn"}
    assert rows["t.txt:all+knn"]["extra"]["retrieval"]["datastore_bytes"] > 0
    # The text is the datastore: retrieval must lower its bits/byte.
    assert rows["t.txt:all+knn"]["samples"][0] < rows["t.txt:all"]["samples"][0]


def test_pickled_datastore_refused_even_with_matching_hashes(retrieval_bundle, tmp_path):
    """A keys.npy holding pickled objects is never unpickled, even when the manifest is rewritten to match."""
    import shutil

    from itera_runtime.bundle import write_manifest

    _, path, _ = retrieval_bundle
    bad = tmp_path / "bundle"
    shutil.copytree(path, bad)
    np.save(bad / "retrieval" / "keys.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    write_manifest(bad, load_bundle(bad, verify=False).manifest)
    with pytest.raises(BundleError, match="not a readable .npy array"):
        open_retriever(load_bundle(bad))
