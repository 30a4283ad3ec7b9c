"""Median decode-step time of baseline KV graphs at given past lengths (numpy I/O).

python scripts/bench_baseline_step.py GRAPH [GRAPH ...] --past 128,2048 --runs 200 --threads 1

Runs are interleaved across graphs (round-robin, one step each) so drifting machine load hits
every graph alike. Prints one markdown row per (graph, past): median, IQR, runs.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import onnxruntime as ort


def make_session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def decode_feed(sess: ort.InferenceSession, past: int, rng: np.random.Generator) -> dict:
    """One-token decode inputs at depth `past`: random K/V, mask of ones, position = past."""
    feed = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = np.array([[7]], np.int64)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones((1, past + 1), np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.array([[past]], np.int64)
        elif i.name.startswith("past_key_values."):
            _, kv, _, hd = i.shape
            feed[i.name] = rng.standard_normal((1, kv, past, hd)).astype(np.float32)
        else:
            raise SystemExit(f"unexpected input {i.name!r}")
    return feed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graphs", nargs="+")
    ap.add_argument("--past", default="128,2048")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    pasts = [int(p) for p in args.past.split(",")]
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {args.threads}, runs {args.runs} after {args.warmup} warm-up")
    print("| graph | past | median ms | IQR ms | runs |\n|---|---:|---:|---:|---:|")
    sessions = {g: make_session(g, args.threads) for g in args.graphs}
    for past in pasts:
        feeds = {g: decode_feed(s, past, rng) for g, s in sessions.items()}
        times = {g: [] for g in sessions}
        for r in range(args.warmup + args.runs):
            for g, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[g])
                dt = time.perf_counter() - t0
                if r >= args.warmup:
                    times[g].append(dt * 1e3)
        for g in sessions:
            t = np.array(times[g])
            q1, med, q3 = np.percentile(t, [25, 50, 75])
            print(f"| {g} | {past} | {med:.3f} | {q3 - q1:.3f} | {len(t)} |")


if __name__ == "__main__":
    main()
