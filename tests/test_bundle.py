"""Bundle contract: a tiny real bundle loads; every kind of damage is refused in one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from itera_runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    BundleError,
    Manifest,
    file_entry,
    initial_state,
    load_bundle,
    sha256_file,
    write_manifest,
)


def write_identity_graph(path):
    """A one-node ONNX graph: logits = Identity(x), with a carried state passed through."""
    nodes = [
        helper.make_node("Identity", ["input_ids"], ["logits"]),
        helper.make_node("Identity", ["past.0.conv"], ["present.0.conv"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("past.0.conv", TensorProto.FLOAT, ["batch", 8, 3]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("present.0.conv", TensorProto.FLOAT, ["batch", 8, 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def write_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(["a tiny bundle for tests", "tiny models, tiny tests"] * 3, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


def tensor(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


def make_manifest(vocab_size):
    io = {
        "inputs": [tensor("input_ids", "int64", ["batch", "sequence"]),
                   tensor("past.0.conv", "float32", ["batch", 8, 3])],
        "outputs": [tensor("logits", "int64", ["batch", "sequence"]),
                    tensor("present.0.conv", "float32", ["batch", 8, 3])],
    }
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "family": "itera",
        "model_config": {"d_model": 8},
        "tokenizer": "tokenizer.json",
        "vocab_size": vocab_size,
        "files": {},
        "graphs": {
            "prefill": {"file": "decode.onnx", **io},
            "decode": {"file": "decode.onnx", **io},
        },
        "io": {"input_ids": "input_ids", "logits": "logits",
               "attention_mask": None, "position_ids": None},
        "state": {
            "kind": "ssm",
            "tensors": [
                {"input": "past.0.conv", "output": "present.0.conv", "dtype": "float32",
                 "shape": ["batch", 8, 3]},
                {"input": "past.0.k", "output": "present.0.k", "dtype": "float16",
                 "shape": ["batch", 4, "past_sequence", 32]},
            ],
        },
        "ssm_path": "function",
        "opset": 17,
        "custom_domains": {},
        "quantization": {"mode": "none"},
    }


@pytest.fixture
def bundle_dir(tmp_path):
    d = tmp_path / "bundle"
    d.mkdir()
    write_identity_graph(d / "decode.onnx")
    vocab_size = write_tokenizer(d / "tokenizer.json")
    write_manifest(d, Manifest.from_json(make_manifest(vocab_size) | {"files": {"x": {"sha256": "-", "bytes": 0}}}),
                   names=["tokenizer.json", "decode.onnx"])
    return d


def rewrite(bundle_dir, **changes):
    """Edit manifest.json in place without re-hashing (simulates a hand-edited bundle)."""
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return manifest


def test_valid_bundle_loads_and_runs(bundle_dir):
    b = load_bundle(bundle_dir)
    assert b.family == "itera"
    assert b.format_version == BUNDLE_FORMAT_VERSION
    assert b.tokenizer_path == bundle_dir / "tokenizer.json"
    assert Tokenizer.from_file(str(b.tokenizer_path)).get_vocab_size() == b.vocab_size
    assert sorted(b.graph_names) == ["decode", "prefill"]
    g = b.graph("decode")
    assert g.file == "decode.onnx" and b.graph_path("decode") == bundle_dir / "decode.onnx"
    assert [t.name for t in g.inputs] == ["input_ids", "past.0.conv"]
    assert g.outputs[1].shape == ["batch", 8, 3]
    assert [s.input for s in b.state] == ["past.0.conv", "past.0.k"]
    assert b.state_kind == "ssm"
    # The graph is a real one: the declared names are what onnxruntime sees.
    sess = ort.InferenceSession(str(b.graph_path("decode")), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [t.name for t in g.inputs]
    state = initial_state(b)
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    logits, present = sess.run(None, {"input_ids": ids, "past.0.conv": state["past.0.conv"]})
    assert np.array_equal(logits, ids) and present.shape == (1, 8, 3)


def test_manifest_is_sorted_pretty_and_hashes_files(bundle_dir):
    text = (bundle_dir / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    entry = file_entry(bundle_dir / "decode.onnx")
    assert manifest["files"]["decode.onnx"] == {"sha256": entry.sha256, "bytes": entry.bytes}
    assert sorted(manifest["files"]) == ["decode.onnx", "tokenizer.json"]
    assert len(sha256_file(bundle_dir / "decode.onnx")) == 64
    assert not list(bundle_dir.glob(".manifest.*"))  # no temp file left behind


def test_manifest_json_round_trips_and_keeps_unknown_keys(bundle_dir):
    text = (bundle_dir / "manifest.json").read_text()
    m = Manifest.from_json(text)
    assert m.to_json() == text
    newer = json.loads(text) | {"signature": {"by": "a future exporter"}}
    m2 = Manifest.from_json(json.dumps(newer))
    assert json.loads(m2.to_json()) == newer
    assert load_bundle(bundle_dir).manifest.files["decode.onnx"].bytes == (bundle_dir / "decode.onnx").stat().st_size


EXAMPLE = Path(__file__).parent / "data" / "manifest.example.json"


def test_example_manifest_parses_into_every_field_and_round_trips_unchanged():
    """tests/data/manifest.example.json documents the format: every key it has is one the runtime reads."""
    example = json.loads(EXAMPLE.read_text())
    m = Manifest.from_json(EXAMPLE.read_text(), str(EXAMPLE))
    assert m.extra == {}  # no key of the example is unknown to the runtime
    assert m.to_dict() == example  # and no field of the runtime is missing from the example
    assert Manifest.from_json(m.to_json()) == m
    assert m.main_set == "fused" and list(m.graph_sets()) == ["fused", "portable"]
    assert m.state.nbytes(batch=1) == (160 * 3 + 8 * 16 * 16) * 4
    assert m.retrieval.lam == 0.25 and m.quantization.mode == "int8"
    assert {name for _, name in m.referenced_files()} == set(m.files)


def test_manifest_of_before_graph_sets_keeps_its_ssm_path_and_new_ones_say_it_by_graph_set():
    example = json.loads(EXAMPLE.read_text())
    old = {k: v for k, v in example.items() if k not in ("graph_set", "alt_graph_sets", "requires")}
    m = Manifest.from_json(old | {"ssm_path": "function"})
    assert m.main_set == "default" and m.ssm_path == "function"
    assert json.loads(m.to_json())["ssm_path"] == "function"  # written back as it was
    new = Manifest.from_json(example)
    assert "ssm_path" not in new.to_dict() and new.ssm_path == "lowered"
    assert new.only_set("portable").ssm_path == "function"
    assert Manifest.from_json(example | {"family": "baseline"}).ssm_path is None


def test_tampered_graph_is_refused(bundle_dir):
    path = bundle_dir / "decode.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch") as e:
        load_bundle(bundle_dir)
    assert "decode.onnx" in str(e.value) and "\n" not in str(e.value)
    load_bundle(bundle_dir, verify=False)  # hashes skipped on request


def test_truncated_file_is_a_size_mismatch(bundle_dir):
    path = bundle_dir / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="size mismatch"):
        load_bundle(bundle_dir)


def test_missing_file_is_refused(bundle_dir):
    (bundle_dir / "decode.onnx").unlink()
    with pytest.raises(BundleError, match=r"decode\.onnx: missing"):
        load_bundle(bundle_dir, verify=False)


def test_newer_format_version_asks_for_upgrade(bundle_dir):
    rewrite(bundle_dir, format_version=BUNDLE_FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match="newer than this itera-runtime supports.*upgrade itera-lite"):
        load_bundle(bundle_dir)


def test_missing_format_version(bundle_dir):
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["format_version"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version is missing"):
        load_bundle(bundle_dir)


def test_unknown_format(bundle_dir):
    rewrite(bundle_dir, format="gguf")
    with pytest.raises(BundleError, match="format is 'gguf'"):
        load_bundle(bundle_dir)


def test_not_a_bundle(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(bundle_dir / "decode.onnx")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)


def test_graph_not_listed_in_files(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    shutil.copy(bundle_dir / "decode.onnx", bundle_dir / "prefill.onnx")
    manifest["graphs"]["prefill"]["file"] = "prefill.onnx"
    rewrite(bundle_dir, graphs=manifest["graphs"])
    with pytest.raises(BundleError, match="graphs.prefill names 'prefill.onnx', which is not listed"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "sub/../../outside.onnx"])
def test_path_traversal_is_refused(bundle_dir, name):
    (bundle_dir.parent / "outside.onnx").write_bytes(b"x")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    entry = file_entry(bundle_dir.parent / "outside.onnx")
    manifest["files"][name] = {"sha256": entry.sha256, "bytes": entry.bytes}
    rewrite(bundle_dir, files=manifest["files"])
    with pytest.raises(BundleError, match="escapes the bundle folder"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="escapes the bundle folder"):
        write_manifest(bundle_dir, Manifest.from_json(json.dumps(manifest)), names=[name])


def test_symlink_out_of_bundle_is_refused(bundle_dir):
    (bundle_dir.parent / "outside.onnx").write_bytes(b"x")
    (bundle_dir / "link.onnx").symlink_to(bundle_dir.parent / "outside.onnx")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    entry = file_entry(bundle_dir / "link.onnx")
    manifest["files"]["link.onnx"] = {"sha256": entry.sha256, "bytes": entry.bytes}
    rewrite(bundle_dir, files=manifest["files"])
    with pytest.raises(BundleError, match="escapes the bundle folder"):
        load_bundle(bundle_dir)


def test_unknown_graph_name(bundle_dir):
    with pytest.raises(BundleError, match=r"no graph 'encoder' \(has: decode, prefill\)"):
        load_bundle(bundle_dir).graph("encoder")


def test_initial_state_shapes(bundle_dir):
    b = load_bundle(bundle_dir)
    state = initial_state(b, batch=3)
    assert set(state) == {"past.0.conv", "past.0.k"}
    assert state["past.0.conv"].shape == (3, 8, 3)
    assert state["past.0.conv"].dtype == np.float32
    assert state["past.0.k"].shape == (3, 4, 0, 32)  # empty KV cache
    assert state["past.0.k"].dtype == np.float16
    assert not state["past.0.conv"].any()


def test_bundle_written_before_the_typed_manifest_still_runs(tiny_bundle, tmp_path):
    """Format 1 as the exporter wrote it before: no params, no per-graph external_data."""
    from itera_runtime import Generator, SamplingConfig

    old = shutil.copytree(tiny_bundle.bundle, tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    del m["params"]
    for g in m["graphs"].values():
        del g["external_data"]
    (old / "manifest.json").write_text(json.dumps(m))
    b = load_bundle(old)
    assert b.manifest.params is None and b.graph("decode").external_data == []
    greedy = SamplingConfig(temperature=0)
    assert (Generator(old, threads=1).generate("To be", 8, greedy).text
            == Generator(tiny_bundle.bundle, threads=1).generate("To be", 8, greedy).text)
