"""Where a decode step's time goes: per op type, per layer, and Python around onnxruntime
(`profile_prompt`: the same for one prefill call, per prompt token).

Three clocks over the same decode steps at one depth and thread count:
- the generate loop (`LoopTiming.decode_s`: step plus greedy sampling), per token;
- onnxruntime's own profiler (session option `enable_profiling`): each `model_run` of the
  decode graph and every kernel inside it, with its op type and node name;
- the difference, split into sampling + loop, the session wrapper (binding, the Python
  call) and onnxruntime's framework time outside kernels. Sampling + loop also gets the
  calling thread's CPU time (`main_thread_cpu_us`), which a busy machine does not inflate
  the way it inflates wall time.
At 2+ threads, kernels that split their work over the thread pool are marked
(`thread_pool_share` per op, and a row summing them): the only part more threads can speed up.

Layers are read from node names (`layers.3`, `blocks.3`); nodes without one are "other".
The profiler adds a little time of its own to each kernel, so the loop is timed in a
separate, unprofiled session.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import tempfile
import time
from collections import defaultdict

from itera_runtime.bundle import Bundle
from itera_runtime.errors import UserError
from itera_runtime.session import PREFILL_CHUNK, ModelSession

from .latency import Target, check_depth, gen_case, prompt_case, step_case
from .record import Record
from .sweep import bundle_fields, stamp

_LAYER = re.compile(r"(?:layers|blocks)[./_](\d+)")


def _quiet_runs(trace: list[dict], n_runs: int) -> tuple[list[dict], list[dict]]:
    """The quieter half of the last n_runs `model_run` events and the kernel events inside them.

    On a shared machine a call the OS preempted shows the wait in whichever kernels were
    running; keeping the calls whose kernels took at most the median total drops those
    (all rows are averaged over the same calls, so they still add up).
    """
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"][-n_runs:]
    if not runs:
        return [], []
    inside: list[list[dict]] = [[] for _ in runs]
    starts = [r["ts"] for r in runs]
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < starts[0]:
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if e["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
            inside[i].append(e)
    totals = [sum(k["dur"] for k in ks) for ks in inside]
    cut = sorted(totals)[(len(totals) - 1) // 2]
    keep = [i for i, t in enumerate(totals) if t <= cut]
    return [runs[i] for i in keep], [k for i in keep for k in inside[i]]


def _used_pool(event: dict) -> bool:
    """Whether a kernel split its work over the intra-op thread pool (a parallel section):
    onnxruntime's profiler lists the blocks the calling thread ran, at 2+ threads only."""
    stats = event.get("args", {}).get("thread_scheduling_stats") or {}
    return bool(stats.get("main_thread", {}).get("block_size"))


def _cpu_timed(run, n_tokens: int):
    """(sample of one run, CPU µs per token of the calling thread during it)."""
    t = time.thread_time_ns()
    sample = run()
    return sample, (time.thread_time_ns() - t) / 1e3 / n_tokens


def profile_bundle(bundle: Bundle, n_depth: int = 128, n_steps: int = 256, threads: int | None = 1) -> list[Record]:
    """Records of kind "profile" (µs per token) for one bundle: op types, layers, overhead split."""
    check_depth(bundle, n_depth, n_steps + 1)
    start = max(n_depth, 1)

    # 1. The loop as users run it (step + greedy sampling) and 2. the raw Decoder.step, both
    # unprofiled, as `itera-bench latency` / `step` time them; median of three runs each.
    target = Target(bundle, threads)
    loop, raw = gen_case(target, n_steps, n_depth), step_case(target, n_steps, n_depth)
    loop_runs = [_cpu_timed(loop.run, n_steps) for _ in range(3)]
    step_runs = [_cpu_timed(raw.run, n_steps) for _ in range(3)]
    loop_us = sorted(1e6 / s.value for s, _ in loop_runs)[1]
    step_us = sorted(s.value for s, _ in step_runs)[1]
    # The calling thread's CPU time is what Python (sampling, the loop, the binding) costs
    # whatever else the machine runs; both runs include one 1-token prefill, which cancels.
    loop_cpu_us = sorted(c for _, c in loop_runs)[1]
    python_cpu_us = max(loop_cpu_us - sorted(c for _, c in step_runs)[1], 0.0)
    tokens = target.context(start + n_steps)[start:].tolist()

    # 3. onnxruntime's profiler on the decode steps.
    with tempfile.TemporaryDirectory(prefix="itera-profile-") as tmp:
        session = ModelSession(bundle, threads=threads, profile_prefix=os.path.join(tmp, "ort"))
        prompt_state = session.prefill(target.context(start)[:start])[1]
        decoder = session.decoder(prompt_state)
        for token in tokens:
            decoder.step(token)
        trace_path = session.graphs["decode"].end_profiling()
        with open(trace_path, encoding="utf-8") as f:
            trace = json.load(f)
    base = _fields(bundle, session, threads, n_gen=n_steps, n_depth=n_depth)
    run_us, _, breakdown = _breakdown(trace, n_steps, 1, threads, base)
    rows = [
        Record(test="loop (step + sampling)", samples=[loop_us], extra={"main_thread_cpu_us": loop_cpu_us}, **base),
        Record(test="sampling + loop python", samples=[max(loop_us - step_us, 0.0)],
               extra={"main_thread_cpu_us": python_cpu_us}, **base),
        Record(test="session wrapper", samples=[max(step_us - run_us, 0.0)], **base,
               method="raw Decoder.step minus onnxruntime's model_run (two runs: may be slightly negative, clipped)"),
        *breakdown,
    ]
    stamp(rows)
    return rows


def _fields(bundle: Bundle, session: ModelSession, threads: int | None, **case) -> dict:
    """What every profile row of one bundle and case shares."""
    return dict(kind="profile", metric="us_per_token", unit="µs", higher_is_better=False, n_threads=threads,
                ort_settings=dict(session.settings), repetitions=1, **case,
                **bundle_fields(bundle, session.graph_set))


def _breakdown(trace: list[dict], n_runs: int, tokens_per_run: int, threads: int | None,
               base: dict) -> tuple[float, float, list[Record]]:
    """(model_run µs, kernel µs, rows) per token over the quieter half of the trace's last n_runs graph
    calls: onnxruntime's framework time, the kernels, those that used the thread pool, each op type
    and each layer."""
    runs, kernels = _quiet_runs(trace, n_runs)
    n = max(1, len(runs)) * tokens_per_run
    run_us = sum(e["dur"] for e in runs) / n
    kernel_us = sum(e["dur"] for e in kernels) / n
    by_op: dict[str, float] = defaultdict(float)
    nodes_by_op: dict[str, set] = defaultdict(set)
    by_layer: dict[str, float] = defaultdict(float)
    pooled_by_op: dict[str, float] = defaultdict(float)  # µs of kernels that split work over threads
    for e in kernels:
        op = e.get("args", {}).get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        by_op[op] += e["dur"] / n
        nodes_by_op[op].add(name)
        if _used_pool(e):
            pooled_by_op[op] += e["dur"] / n
        m = _LAYER.search(name)
        by_layer[f"layer {int(m.group(1))}" if m else "other"] += e["dur"] / n
    rows = [
        Record(test="ort framework (model_run - kernels)", samples=[max(run_us - kernel_us, 0.0)], **base),
        Record(test="kernels", samples=[kernel_us], extra={"nodes": sum(len(v) for v in nodes_by_op.values())},
               **base),
    ]
    pooled = threads is not None and threads > 1
    if pooled:
        # Amdahl's bound for more threads: only these kernels can get faster.
        us = sum(pooled_by_op.values())
        rows.append(Record(test="kernels that used the thread pool", samples=[us], **base,
                           extra={"share_of_kernels": us / kernel_us if kernel_us else None,
                                  "ops": sorted(pooled_by_op)}))
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        extra = {"nodes": len(nodes_by_op[op]), "share_of_kernels": us / kernel_us if kernel_us else None}
        if pooled:
            extra["thread_pool_share"] = pooled_by_op[op] / us if us else 0.0
        rows.append(Record(test=f"op {op}", samples=[us], extra=extra, **base))
    for layer, us in sorted(by_layer.items(), key=lambda kv: (kv[0] == "other", int(kv[0].split()[-1])
                                                               if kv[0] != "other" else 0)):
        rows.append(Record(test=layer, samples=[us], **base))
    return run_us, kernel_us, rows


PROMPT_CALLS = 6  # profiled prefill calls (the quieter half is kept)


def profile_prompt(bundle: Bundle, n_prompt: int, n_depth: int = 0, threads: int | None = 1) -> list[Record]:
    """Records of kind "profile" (µs per prompt token) for one prefill call of n_prompt tokens after
    n_depth: the prompt as `itera-bench latency -p` times it, then op types and layers."""
    if n_prompt > PREFILL_CHUNK:
        raise UserError(f"-p {n_prompt}: a prompt profile is of one prefill graph call, at most "
                        f"{PREFILL_CHUNK} tokens (longer prompts are that many calls)")
    target = Target(bundle, threads)
    case = prompt_case(target, n_prompt, n_depth)
    case.run()  # warm-up, as latency's
    wall_us = sorted(1e6 / case.run().value for _ in range(3))[1]
    ids = target.context(n_depth + n_prompt)[n_depth:]
    with tempfile.TemporaryDirectory(prefix="itera-profile-") as tmp:
        session = ModelSession(bundle, threads=threads, profile_prefix=os.path.join(tmp, "ort"))
        state = session.prefill(target.context(n_depth))[1] if n_depth else None
        for _ in range(1 + PROMPT_CALLS):  # a warm-up, then the calls the rows average
            session.prefill(ids, state)
        with open(session.graphs["prefill"].end_profiling(), encoding="utf-8") as f:
            trace = json.load(f)
    base = _fields(bundle, session, threads, n_prompt=n_prompt, n_gen=0, n_depth=n_depth)
    _, _, breakdown = _breakdown(trace, PROMPT_CALLS, n_prompt, threads, base)
    rows = [Record(test="prompt (prefill + first token)", samples=[wall_us], **base), *breakdown]
    stamp(rows)
    return rows
