"""Export the Transformer baseline (LlamaForCausalLM) to one ONNX graph with a KV cache.

optimum's Llama OnnxConfig does the export (task "text-generation-with-past"): one graph serves
prefill (past length 0) and decode. We only rename its symbolic dims to the bundle's names and
read the manifest fragment back from the written graph.

Glossary: B batch, S new tokens this call, P past length, T = P + S, V vocab, H kv heads, D head dim.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["export_baseline_graphs", "graph_io", "check_parity", "GRAPH_FILE"]

GRAPH_FILE = "model.onnx"
# protobuf refuses messages over 2 GiB; below that the graph stays one file.
_SINGLE_FILE_LIMIT = 2**31 - 2**24

# optimum's dim names -> the bundle's.
_DIM_NAMES = {
    "batch_size": "batch",
    "sequence_length": "seq",
    "past_sequence_length": "past_sequence",
    "past_sequence_length + sequence_length": "total_sequence",
}


def _np_dtype(elem_type: int) -> str:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def _spec(value_info) -> dict[str, Any]:
    t = value_info.type.tensor_type
    shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    return {"name": value_info.name, "dtype": _np_dtype(t.elem_type), "shape": shape}


def graph_io(path: Path) -> tuple[list[dict], list[dict], int]:
    """(inputs, outputs, node count) of an ONNX file, without loading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    return [_spec(v) for v in g.input], [_spec(v) for v in g.output], len(g.node)


def _rename_dims(model) -> None:
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in _DIM_NAMES:
                d.dim_param = _DIM_NAMES[d.dim_param]


def _save(model, dst: Path) -> list[str]:
    """Write `model` to dst atomically (one file when it fits); returns the file names written."""
    import onnx

    tmp = dst.with_name(f".{dst.name}.tmp")
    files = [dst.name]
    if model.ByteSize() < _SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(tmp))
    else:
        data = dst.name + ".data"
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        files.append(data)
    os.replace(tmp, dst)
    return files


def export_baseline_graphs(model, out_dir: Path, opset: int = 18) -> dict:
    """Export `model.llama` (a Baseline) to out_dir/model.onnx; return the manifest fragment.

    The fragment holds "graphs", "io", "state", "ssm_path", "opset", "custom_domains" and
    "nodes"; "files" lists what was written (model.onnx, plus model.onnx.data past 2 GiB).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llama = model.llama
    was_training = llama.training
    llama.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="itera-optimum-") as tmp:
            # Post-processing (on by default) removes the duplicate tied lm_head initializer;
            # it finds the tie through accelerate, so accelerate must be installed.
            onnx_export_from_model(
                llama,
                tmp,
                opset=opset,
                task="text-generation-with-past",
                device="cpu",
                do_validation=False,  # check_parity does a stricter, decode-by-decode check
            )
            exported = Path(tmp) / GRAPH_FILE
            if not exported.exists():
                raise RuntimeError(f"optimum wrote {sorted(os.listdir(tmp))}, expected {GRAPH_FILE}")
            onnx_model = onnx.load(str(exported))  # pulls in external data, if any
    finally:
        llama.train(was_training)
    _rename_dims(onnx_model)
    files = _save(onnx_model, out_dir / GRAPH_FILE)
    del onnx_model
    return manifest_fragment(out_dir / GRAPH_FILE, opset, files)


def manifest_fragment(path: Path, opset: int, files: list[str] | None = None) -> dict:
    """The manifest fragment of a baseline graph, read from the graph itself."""
    inputs, outputs, n_nodes = graph_io(path)
    in_names = {t["name"] for t in inputs}
    out_by_name = {t["name"]: t for t in outputs}
    for required in ("input_ids", "attention_mask"):
        if required not in in_names:
            raise RuntimeError(f"{path.name}: exported graph has no {required!r} input")
    if "logits" not in out_by_name:
        raise RuntimeError(f"{path.name}: exported graph has no 'logits' output")
    state = []
    for t in inputs:
        if not t["name"].startswith("past_key_values."):
            continue
        out_name = "present." + t["name"][len("past_key_values.") :]
        if out_name not in out_by_name:
            raise RuntimeError(f"{path.name}: no output {out_name!r} for state input {t['name']!r}")
        state.append({"input": t["name"], "output": out_name, "dtype": t["dtype"], "shape": t["shape"]})
    if not state:
        raise RuntimeError(f"{path.name}: exported graph has no past_key_values inputs")
    graph = {"file": path.name, "inputs": inputs, "outputs": outputs}
    fragment = {
        "graphs": {"prefill": dict(graph), "decode": dict(graph)},
        "io": {
            "input_ids": "input_ids",
            "logits": "logits",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids" if "position_ids" in in_names else None,
        },
        "state": {"kind": "kv_cache", "tensors": state},
        "ssm_path": None,
        "opset": opset,
        "custom_domains": {},
        "nodes": {"prefill": n_nodes, "decode": n_nodes},
    }
    if files is not None:
        fragment["files"] = files
    return fragment


# ----------------------------------------------------------------------------- validation


class _KVRunner:
    """Feeds a baseline graph prompt-then-one-token-at-a-time, carrying present -> past."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.has_pos = "position_ids" in ins
        self.past = [n for n in ins if n.startswith("past_key_values.")]
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.kv_shape = {n: ins[n].shape for n in self.past}

    def reset(self, batch: int = 1) -> None:
        self.total = 0
        self.state = {n: np.zeros((batch, s[1], 0, s[3]), np.float32) for n, s in self.kv_shape.items()}

    def __call__(self, ids: np.ndarray) -> np.ndarray:  # (B, S) -> logits (B, S, V)
        b, s = ids.shape
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, self.total + s), np.int64)}
        if self.has_pos:
            feed["position_ids"] = np.broadcast_to(np.arange(self.total, self.total + s, dtype=np.int64), (b, s)).copy()
        feed.update(self.state)
        outs = dict(zip(self.out_names, self.sess.run(None, feed)))
        for n in self.past:
            self.state[n] = outs["present." + n[len("past_key_values.") :]]
        self.total += s
        return outs["logits"]


def check_parity(model, graph: Path, prompt_len: int = 32, steps: int = 64, seed: int = 0) -> dict:
    """Compare an exported (or quantized) baseline graph with torch; report, never assert.

    Teacher-forced: ORT prefill on `prompt_len` random tokens, then `steps` one-token decode
    steps, against one torch forward over the whole sequence. Greedy: `steps` tokens from the
    prompt, ORT with KV cache vs torch repeated full forward + argmax.
    Returns max_abs_diff (over all positions), top1_agreement (fraction of positions whose
    argmax matches), greedy_ort / greedy_torch token lists and greedy_prefix_match (tokens
    equal before the first divergence).
    """
    import torch

    rng = np.random.default_rng(seed)
    vocab = model.llama.config.vocab_size
    seq = rng.integers(0, vocab, size=(1, prompt_len + steps), dtype=np.int64)
    runner = _KVRunner(Path(graph))

    runner.reset()
    chunks = [runner(seq[:, :prompt_len])]
    for t in range(prompt_len, prompt_len + steps):
        chunks.append(runner(seq[:, t : t + 1]))
    ort_logits = np.concatenate(chunks, axis=1)
    llama = model.llama.eval()
    with torch.no_grad():
        ref = llama(input_ids=torch.from_numpy(seq), use_cache=False).logits.float().numpy()
    diff = float(np.abs(ort_logits - ref).max())
    top1 = float((ort_logits.argmax(-1) == ref.argmax(-1)).mean())

    prompt = seq[:, :prompt_len]
    runner.reset()
    logits = runner(prompt)
    greedy_ort = []
    for _ in range(steps):
        tok = int(logits[0, -1].argmax())
        greedy_ort.append(tok)
        logits = runner(np.array([[tok]], np.int64))
    ids = torch.from_numpy(prompt)
    greedy_torch = []
    with torch.no_grad():
        for _ in range(steps):
            tok = int(llama(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            greedy_torch.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    prefix = next((i for i, (a, b) in enumerate(zip(greedy_ort, greedy_torch)) if a != b), steps)
    return {
        "prompt_len": prompt_len,
        "steps": steps,
        "seed": seed,
        "max_abs_diff": diff,
        "top1_agreement": top1,
        "greedy_ort": greedy_ort,
        "greedy_torch": greedy_torch,
        "greedy_prefix_match": prefix,
    }
