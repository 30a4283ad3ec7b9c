"""Memory of a fresh process that loads a bundle and generates, split into where it goes.

Each repetition starts a new Python process (`python -m itera_bench.memory BUNDLE ...`, this
module's probe: torch-free, importing only the runtime) that loads the bundle, prefills
`depth` tokens, generates `n_gen` more, and reports its own /proc/self/status counters:

- `peak_rss_bytes`: VmHWM at the end, the peak resident memory of that process alone
  (never system-wide memory, never the parent's: a child's ru_maxrss would include the
  parent's pages at fork time). Includes the interpreter, numpy and onnxruntime.
- in `extra`: `import_rss_bytes` (VmRSS once the runtime is imported, before the bundle),
  `load_rss_bytes` (after the sessions are made), split into `load_rss_file_bytes` (RssFile:
  pages mapped from files, e.g. onnxruntime's own library) and `load_rss_anon_bytes` (RssAnon:
  weights copied into onnxruntime's arena); `model_bytes` on disk.
- `state_bytes`: the carried state after `depth` tokens, computed from the manifest
  (`StateSpec.nbytes`): constant for the SSM, growing with depth for the KV cache. The probe
  also reports what the runtime actually holds (`State.nbytes`); a mismatch is an error,
  and both are in the record.
"""

from __future__ import annotations

import json
import subprocess
import sys

from itera_runtime.errors import UserError

STATUS_FIELDS = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "rss_anon", "RssFile": "rss_file"}


def _status() -> dict[str, int | None]:
    """This process's memory counters in bytes (None where the OS has no /proc)."""
    out: dict[str, int | None] = dict.fromkeys(STATUS_FIELDS.values())
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_FIELDS:
                    out[STATUS_FIELDS[key]] = int(rest.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out


def probe(bundle_path: str, depth: int, n_gen: int, threads: int | None, graph_set: str | None = None) -> dict:
    """Load, prefill `depth` tokens, generate `n_gen`; this process's memory at each stage."""
    before = _status()  # imports of this module only: the interpreter floor
    import numpy as np

    from itera_runtime.bundle import load_bundle
    from itera_runtime.generate import generate_tokens, peak_rss_mb
    from itera_runtime.sampling import Sampler, SamplingConfig
    from itera_runtime.session import ModelSession

    imported = _status()
    bundle = load_bundle(bundle_path, verify=False)  # the parent verified it
    session = ModelSession(bundle, threads=threads, graph_set=graph_set)
    loaded = _status()
    ids = np.arange(depth + 1, dtype=np.int64) % bundle.vocab_size
    state = session.prefill(ids[:depth])[1] if depth else session.initial_state()
    runtime_state = state.nbytes
    position = state.position
    for _ in generate_tokens(session, ids[depth:], n_gen, Sampler(SamplingConfig(temperature=0)), state=state):
        pass
    end = _status()
    peak = end["hwm"]
    if peak is None:  # no /proc (macOS, Windows): the runtime's own portable counter
        mb = peak_rss_mb()
        peak = None if mb is None else int(mb * (1 << 20))
    return {"start_rss_bytes": before["rss"], "import_rss_bytes": imported["rss"], "load_rss_bytes": loaded["rss"],
            "load_rss_anon_bytes": loaded["rss_anon"], "load_rss_file_bytes": loaded["rss_file"],
            "end_rss_bytes": end["rss"], "peak_rss_bytes": peak, "state_position": position,
            "runtime_state_bytes": runtime_state, "torch_imported": "torch" in sys.modules}


def run_probe(bundle_path: str, depth: int, n_gen: int, threads: int | None, graph_set: str | None = None,
              timeout: float = 600) -> dict:
    """Run `probe` in a fresh interpreter and return what it measured."""
    cmd = [sys.executable, "-m", "itera_bench.memory", str(bundle_path), str(depth), str(n_gen),
           str(threads or 0), graph_set or ""]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"memory probe of {bundle_path} did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:  # the child's last line: what it failed on
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"memory probe of {bundle_path} failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_bytes(bundle, depth: int) -> int:
    """Carried state after `depth` tokens, from the manifest alone."""
    return bundle.manifest.state.nbytes(batch=1, past_sequence=depth)


def memory_cases(bundles, threads: list[int], depths: list[int], n_gen: int):
    """One peak-RSS case per (bundle, threads, depth); each repetition is a fresh process."""
    from itera_runtime.bundle import BundleError
    from itera_runtime.graphcheck import pick_graph_set
    from itera_runtime.options import thread_settings

    from .latency import check_depth
    from .record import Record
    from .sweep import Case, Sample, bundle_fields

    cases = []
    for b in bundles:
        graph_set = pick_graph_set(b)  # the probe's process runs the set this one would
        for d in depths:
            check_depth(b, d, n_gen)
            for t in threads:
                expected = state_bytes(b, d)

                def run(b=b, d=d, t=t, expected=expected, graph_set=graph_set) -> Sample:
                    m = run_probe(str(b.path), d, n_gen, t, graph_set)
                    if m["runtime_state_bytes"] != expected:
                        raise BundleError(f"{b.path}: the runtime holds {m['runtime_state_bytes']} bytes of "
                                           f"state at depth {d} but the manifest says {expected}")
                    if m["peak_rss_bytes"] is None:
                        raise UserError("this OS reports no peak resident memory for a process")
                    extra = {k: v for k, v in m.items() if k not in ("peak_rss_bytes", "torch_imported") and v is not None}
                    return Sample(float(m["peak_rss_bytes"]), extra=extra)

                rec = Record(kind="memory", test=f"tg{n_gen}@d{d}", metric="peak_rss_bytes", unit="B",
                             higher_is_better=False, n_gen=n_gen, n_depth=d, n_threads=t,
                             ort_settings=thread_settings(t),
                             method="VmHWM of a fresh process that loads the bundle, prefills n_depth "
                                    "tokens and generates n_gen",
                             extra={"model_bytes": b.size_bytes, "state_kind": b.state_kind,
                                    "state_bytes": expected}, **bundle_fields(b, graph_set))
                cases.append(Case(rec, run))
    return cases


def state_records(bundles, depths: list[int], n_gen: int, measured) -> list:
    """One `state_bytes` row per (bundle, depth): the manifest's count, equal to the runtime's."""
    from .record import Record
    from .sweep import bundle_fields

    seen = {(r.bundle, r.n_depth): r for r in measured}
    rows = []
    for b in bundles:
        for d in depths:
            m = seen.get((str(b.path), d))
            if m is None:  # interrupted before this bundle/depth ran
                continue
            rows.append(Record(kind="memory", test=f"state@d{d}", metric="state_bytes", unit="B",
                               samples=[float(state_bytes(b, d))], higher_is_better=False, n_depth=d,
                               n_gen=n_gen, n_threads=None, repetitions=1, warmup=False,
                               method="manifest StateSpec.nbytes, checked equal to the runtime's State.nbytes",
                               extra={"state_kind": b.state_kind,
                                      "runtime_state_bytes": m.extra.get("runtime_state_bytes")},
                               provenance=m.provenance, build_commit=m.build_commit, cpu_info=m.cpu_info,
                               **bundle_fields(b)))
    return rows


def main(argv: list[str]) -> None:
    """The probe's entry point: BUNDLE DEPTH N_GEN THREADS (0: onnxruntime decides) GRAPH_SET ("": the
    runtime picks); JSON out."""
    bundle, depth, n_gen, threads, graph_set = argv
    print(json.dumps(probe(bundle, int(depth), int(n_gen), int(threads) or None, graph_set or None)))


if __name__ == "__main__":
    main(sys.argv[1:])
