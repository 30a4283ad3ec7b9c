"""Decode-step latency of the exported Itera-Lite graphs: ai.itera function path vs fused path.

    python scripts/bench_decode_step.py --preset tiny --vocab 2048 --runs 500

Exports a seeded random model both ways, then times `session.run` of decode.onnx (batch 1,
numpy I/O, state carried step to step) with onnxruntime at ORT_ENABLE_ALL, 1 intra-op
thread. The two paths are timed in interleaved rounds so machine drift hits both alike.
Prints a markdown table: median and IQR per step, node counts as written and after ORT's
optimisation, file sizes.
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import torch

from itera_export.itera import export_itera_graphs
from itera_lite.models import build_model, make_config

PATHS = {"function": "none", "fused": "fused"}


def _session(path: Path, threads: int, optimized_to: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _Stepper:
    """Runs decode.onnx one token at a time, feeding each step's present state back as past."""

    def __init__(self, sess: ort.InferenceSession, manifest: dict):
        self.sess = sess
        self.state_io = [(t["input"], t["output"]) for t in manifest["state"]["tensors"]]
        self.feed = {"input_ids": np.zeros((1, 1), dtype=np.int64)}
        for t in manifest["state"]["tensors"]:
            self.feed[t["input"]] = np.zeros([1, *t["shape"][1:]], dtype=np.float32)
        self.outputs = ["logits"] + [o for _, o in self.state_io]

    def step(self) -> None:
        out = self.sess.run(self.outputs, self.feed)
        self.feed["input_ids"][0, 0] = int(out[0][0, 0].argmax())
        for (i, _), v in zip(self.state_io, out[1:]):
            self.feed[i] = v


@click.command()
@click.option("--preset", default="tiny", show_default=True)
@click.option("--vocab", default=2048, show_default=True)
@click.option("--runs", default=500, show_default=True, help="timed steps per path (>= 200)")
@click.option("--warmup", default=50, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(preset: str, vocab: int, runs: int, warmup: int, threads: int, seed: int) -> None:
    if runs < 200:
        raise click.BadParameter("use at least 200 timed runs", param_hint="--runs")
    torch.set_num_threads(1)  # export only; tiny eager ops crawl with OpenMP on a busy box
    torch.manual_seed(seed)
    model = build_model(make_config("itera", preset, vocab_size=vocab)).eval()
    rows, steppers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, lower in PATHS.items():
            out = Path(tmp) / label
            manifest = export_itera_graphs(model, out, lower=lower)
            decode = out / "decode.onnx"
            opt = out / "decode.optimized.onnx"
            sess = _session(decode, threads, optimized_to=opt)
            rows[label] = {
                "nodes": manifest["nodes"]["decode"],
                "nodes_opt": len(onnx.load(str(opt)).graph.node),
                "decode_kb": decode.stat().st_size / 1024,
                "prefill_kb": (out / "prefill.onnx").stat().st_size / 1024,
                "times": [],
            }
            steppers[label] = _Stepper(sess, manifest)

        for s in steppers.values():
            for _ in range(warmup):
                s.step()
        rounds, per_round = 10, max(1, -(-runs // 10))
        for _ in range(rounds):
            for label, s in steppers.items():
                times = rows[label]["times"]
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    s.step()
                    times.append(time.perf_counter() - t0)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"command: {' '.join(sys.argv)}")
    print(f"itera {preset}, vocab {vocab}, seed {seed}; onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
          f"torch {torch.__version__}; {cpu}; intra_op_num_threads={threads}; "
          f"{rounds * per_round} timed steps per path after {warmup} warm-up, interleaved in {rounds} rounds\n")
    print("| path | decode step median (µs) | IQR (µs) | nodes written | nodes after ORT_ENABLE_ALL | decode.onnx (KiB) | prefill.onnx (KiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        us = [t * 1e6 for t in r["times"]]
        q1, _, q3 = statistics.quantiles(us, n=4)
        med = statistics.median(us)
        flag = " ⚠ spread" if (q3 - q1) > 0.25 * med else ""
        print(f"| {label} | {med:.1f}{flag} | {q3 - q1:.1f} | {r['nodes']} | {r['nodes_opt']} | "
              f"{r['decode_kb']:.0f} | {r['prefill_kb']:.0f} |")


if __name__ == "__main__":
    main()
