"""itera-bench: measured, reproducible comparisons of bundles (no torch).

    itera-bench latency BUNDLE... -p 512 -n 64 -d 128,2048 -t 1,2 -r 5 -o md
    itera-bench step BUNDLE... -d 128,2048            # the raw decode step, µs per token
    itera-bench profile BUNDLE... -d 128 -t 1         # per op type / layer / Python overhead (-p 512: a prompt)
    itera-bench memory BUNDLE... -d 0,512,2048        # peak RSS of a fresh process; state bytes
    itera-bench quality BUNDLE... --data shakespeare  # loss, perplexity, bits/byte (onnxruntime)
    itera-bench flops BUNDLE... -d 0,128,2048         # FLOPs per token: analytic and from the graph
    itera-bench energy BUNDLE... -p 128 -n 64         # J/token gross and net of idle; CPU time always
    itera-bench serve BUNDLE... -c 1,4,16             # itera-serve on loopback: TTFT, tokens/s, chat sessions
    itera-bench all BUNDLE... -o results/             # every subcommand above, then the report
    itera-bench report results/ --runs runs/itera-tiny -o report/   # tables, plots, curves
    itera-bench claims ITERA_BUNDLE... --baseline BUNDLE --results results/
    itera-bench compare OLD.jsonl NEW.jsonl           # two runs side by side: speed-up, significance
    itera-bench latency BUNDLE... --host pi@pi5.local # any subcommand, on a device over ssh

List options sweep their product, as llama-bench's do; bundles are visited round-robin
across repetitions; every row carries its provenance. Ctrl-C prints the rows already
measured and exits 130.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from itera_runtime.errors import OneLineErrorsGroup, UsageError, fail
from itera_runtime.graphcheck import GRAPH_SET_ENV

from .energy import BACKENDS as ENERGY_BACKENDS
from .invocation import Invocation
from .params import IntList, IntPair, n_depth_option, n_gen_option, n_prompt_option, threads_option
from .record import FORMATS, Record, format_records


def bench_command(fn):
    """Shared options of every measuring subcommand: bundles, threads, repetitions, warm-up,
    output, baseline, graph set, and the devices to run on instead of here."""

    @click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=str))
    @threads_option()
    @click.option("-r", "--repetitions", default=5, show_default=True, type=click.IntRange(1))
    @click.option("--no-warmup", is_flag=True, help="skip the untimed first run of each case")
    @click.option("-o", "--output", type=click.Choice(FORMATS), default="md", show_default=True)
    @click.option("--baseline", default=None, type=click.Path(path_type=str),
                  help="bundle the ratios are against [default: the first baseline-family bundle]")
    @click.option("--graph-set", default=None, envvar=GRAPH_SET_ENV, show_envvar=True, metavar="NAME",
                  help="run this graph set (fused, portable) of each bundle that has it; the others run the "
                       "set this onnxruntime picks")
    @click.option("--host", "hosts", multiple=True, metavar="SSH_TARGET",
                  help="run on this device over ssh instead (repeatable; `local` adds this machine)")
    @click.option("--device-profile", "device_profiles", multiple=True, metavar="NAME",
                  help="run on the device of this profile (a name, or a .toml file)")
    @click.option("--fleet", default=None, type=click.Path(dir_okay=False, path_type=str),
                  help="run on every host of this fleet file, in parallel")
    @functools.wraps(fn)
    def wrapper(bundles, threads, repetitions, no_warmup, output, baseline, graph_set, hosts, device_profiles, fleet,
                **kw):
        from itera_runtime.options import check_threads

        from .sweep import compare_to_baseline

        devices, run_here = [], True
        if hosts or device_profiles or fleet:  # devices/ is imported only when asked for
            from itera_devices.remote import select_devices

            devices, run_here = select_devices(hosts, device_profiles, fleet)
        if run_here:  # a device checks its own CPUs
            for t in threads:
                check_threads(t)
        loaded = [_load(b, fn, graph_set) for b in bundles]  # verified once, before any progress
        if baseline is not None and baseline not in bundles:
            raise UsageError(f"--baseline {baseline} is not one of the bundles measured")
        records: list[Record] = []
        code = 0
        if devices:
            from itera_devices.remote import bench_on_devices

            records, code = bench_on_devices(Invocation.from_context(click.get_current_context()), loaded, devices)
        if run_here and code != 130:
            try:
                records = fn(loaded, threads=threads, repetitions=repetitions, warmup=not no_warmup, **kw) + records
            except OSError as e:  # a file or device this machine refuses: the user's to fix
                fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        compare_to_baseline(records, baseline)
        click.echo(format_records(records, output))
        if any(r.interrupted for r in records):
            code = 130
        if code:
            sys.exit(code)

    return wrapper


def paced(fn):
    """Options for subcommands that sweep cases (put under @bench_command): pacing between case
    runs and the sensors' root; the function gets them as one `thermal=ThermalOptions`."""

    @click.option("--delay", "delay_s", default=0.0, show_default=True, type=click.FloatRange(0),
                  help="seconds to sleep between case runs (llama-bench --delay)")
    @click.option("--cool-to", "cool_to_c", default=None, type=float, metavar="CELSIUS",
                  help="before each case run, wait until the CPU/SoC temperature is below this")
    @click.option("--cool-timeout", "cool_timeout_s", default=300.0, show_default=True,
                  type=click.FloatRange(0, min_open=True), help="most seconds one --cool-to wait lasts")
    @click.option("--sysfs-root", default="/sys", show_default=True,
                  help="where thermal_zone* and cpufreq are read (another sysfs mount, or a test tree)")
    @functools.wraps(fn)
    def wrapper(*args, delay_s, cool_to_c, cool_timeout_s, sysfs_root, **kw):
        from .thermal import ThermalOptions

        thermal = ThermalOptions(delay_s, cool_to_c, cool_timeout_s, sysfs_root, kw.get("vcgencmd", "vcgencmd"))
        return fn(*args, thermal=thermal, **kw)

    return wrapper


def accepts_gguf(fn):
    """Mark a subcommand that also measures .gguf files through llama.cpp (put under @bench_command)."""
    fn.accepts_gguf = True
    return fn


def _load(path: str, fn, graph_set: str | None = None):
    """A bundle, verified (with only its `graph_set` where it has one of that name); or, for
    subcommands that take one, a .gguf model for llama.cpp."""
    from itera_runtime.bundle import load_bundle

    from .llamacpp import GgufModel, is_gguf

    if is_gguf(path):
        if not getattr(fn, "accepts_gguf", False):
            raise UsageError(f"{path}: a GGUF file is measured by `itera-bench latency`, `step` and `quality` only")
        return GgufModel(path)
    bundle = load_bundle(path)
    return bundle.with_graph_set(graph_set) if graph_set in bundle.manifest.graph_sets() else bundle


# ------------------------------------------------------------------ the measuring subcommands


@dataclass(frozen=True)
class Measurement:
    """A measuring subcommand, as `itera-bench all` runs it."""

    command: click.Command
    small: Callable[[list[int]], dict[str, Any]]  # depths → options that finish in minutes on 2 cores

    @property
    def accepts_gguf(self) -> bool:
        return getattr(self.command.callback, "accepts_gguf", False)


MEASUREMENTS: dict[str, Measurement] = {}  # by subcommand name, in the order `all` runs them


def measurement(small: Callable[[list[int]], dict[str, Any]] = lambda depths: {}):
    """Register a subcommand (put above @main.command()) with the options `all` gives it."""

    def register(command: click.Command) -> click.Command:
        MEASUREMENTS[command.name or ""] = Measurement(command, small)
        return command

    return register


def suite(bundles: list[str], threads: list[int], repetitions: int, depths: list[int], baseline: str | None = None,
          skip=(), options: dict[str, dict[str, Any]] | None = None,
          shared: dict[str, Any] | None = None) -> list[Invocation]:
    """What `itera-bench all` runs: every measuring subcommand on the bundles it takes.

    options: {subcommand: {option: value}} in place of its small options; shared: {option:
    value} for every subcommand that has the option (the pipeline's corpus, `all`'s --delay).
    """
    from .llamacpp import is_gguf

    out = []
    for name, m in MEASUREMENTS.items():
        models = [b for b in bundles if m.accepts_gguf or not is_gguf(b)]
        if name in skip or not models:
            continue
        inv = Invocation.of(m.command, models, output="jsonl", repetitions=repetitions).with_shared(
            {"threads": list(threads), "baseline": baseline})
        out.append(inv.replace(**(options or {}).get(name, m.small(list(depths)))).with_shared(shared or {}))
    return out


@click.group(cls=OneLineErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Benchmark exported bundles; every row carries its provenance."""


def _targets(bundles, threads):
    from .latency import Target

    return [Target(b, t) for b in bundles for t in threads]


def _latency_cases(bundles, threads, n_prompt, n_gen, n_depth, flash_attn="auto", n_pg=(), loop="auto"):
    """ONNX bundles and llama.cpp models in the order given, each at every thread count."""
    from . import latency, llamacpp

    cases = []
    for b in bundles:
        for t in threads:
            if isinstance(b, llamacpp.GgufModel):
                if n_pg:
                    raise UsageError(f"{b.path}: -pg is measured for ONNX bundles only")
                cases += latency.latency_cases([llamacpp.make_target(b, t, flash_attn, loop)], n_prompt, n_gen, n_depth,
                                               prompt=llamacpp.prompt_case, gen=llamacpp.gen_case)
            else:
                cases += latency.latency_cases([latency.Target(b, t)], n_prompt, n_gen, n_depth, n_pg=n_pg)
    return cases


def _span(depths: list[int]) -> list[int]:
    """No context first, then the depths, once each."""
    return list(dict.fromkeys([0, *depths]))


@measurement(lambda depths: dict(n_prompt=[512], n_gen=[32], n_pg=((512, 32),), n_depth=_span(depths)))
@main.command()
@bench_command
@n_prompt_option((512,))
@n_gen_option((64,))
@n_depth_option((128, 2048))
@click.option("-pg", "--n-prompt-gen", "n_pg", type=IntPair(), multiple=True,
              help="one request: P prompt tokens then G decode steps (row ppP+tgG) and its time to first "
                   "token (ms); repeatable")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="llama.cpp (.gguf) only: auto times both and keeps the faster")
@click.option("--llamacpp-loop", "loop", type=click.Choice(["auto", "llama-bench", "decode", "eval"]), default="auto",
              show_default=True,
              help="llama.cpp (.gguf) loop timed: llama-bench = llama.cpp's own binary ($ITERA_LLAMA_BENCH or "
                   "on PATH), decode = llama_decode on a reused batch through llama-cpp-python, eval = its "
                   "Llama.eval per token; auto = llama-bench where installed, else decode")
@paced
@accepts_gguf
def latency(bundles, threads, repetitions, warmup, n_prompt, n_gen, n_depth, n_pg, flash_attn, loop, thermal):
    """Prompt tokens/s (ppN), decode tokens/s (tgN) and requests (ppP+tgG, TTFT) of each BUNDLE (or .gguf)."""
    from .latency import ttft_records
    from .sweep import run_cases

    cases = _latency_cases(bundles, threads, n_prompt, n_gen, n_depth, flash_attn, n_pg, loop)
    records = run_cases(cases, repetitions, warmup, desc="latency", thermal=thermal)
    return records + ttft_records(cases, records)


@measurement(lambda depths: dict(n_steps=64, n_depth=list(depths)))
@main.command()
@bench_command
@click.option("-n", "--n-steps", default=256, show_default=True, type=click.IntRange(1), help="steps per repetition")
@n_depth_option((128, 2048))
@paced
@accepts_gguf
def step(bundles, threads, repetitions, warmup, n_steps, n_depth, thermal):
    """The raw decode step of each BUNDLE or .gguf (no sampling), µs per token."""
    from . import llamacpp
    from .latency import step_case
    from .sweep import run_cases

    cases = []
    for b in bundles:
        for t in threads:
            if isinstance(b, llamacpp.GgufModel):
                target = llamacpp.GgufTarget(b, t)
                cases += [llamacpp.step_case(target, n_steps, d) for d in n_depth]
            else:
                cases += [step_case(target, n_steps, d) for target in _targets([b], [t]) for d in n_depth]
    return run_cases(cases, repetitions, warmup, desc="step", thermal=thermal)


@measurement(lambda depths: dict(n_steps=64, n_depth=[depths[0]]))
@main.command()
@bench_command
@click.option("-n", "--n-steps", default=256, show_default=True, type=click.IntRange(1))
@click.option("-p", "--n-prompt", default=0, show_default=True, type=click.IntRange(0),
              help="profile one prefill call of this many tokens instead of decode steps (µs per prompt token)")
@n_depth_option((128,))
def profile(bundles, threads, repetitions, warmup, n_steps, n_prompt, n_depth):
    """Where a decode step's (or, with -p, a prompt's) time goes: op types, layers, Python around onnxruntime."""
    from .profile import profile_bundle, profile_prompt

    if n_prompt:
        return [r for b in bundles for t in threads for d in n_depth for r in profile_prompt(b, n_prompt, d, t)]
    return [r for b in bundles for t in threads for d in n_depth for r in profile_bundle(b, d, n_steps, t)]


@measurement(lambda depths: dict(n_gen=16, n_depth=_span(depths)))
@main.command()
@bench_command
@n_depth_option((0, 512, 2048), help="tokens of context before generating (list)")
@click.option("-n", "--n-gen", default=64, show_default=True, type=click.IntRange(1), help="tokens generated")
@paced
def memory(bundles, threads, repetitions, warmup, n_depth, n_gen, thermal):
    """Peak RSS of a fresh process that loads each BUNDLE and generates; carried state by depth."""
    from .memory import memory_cases, state_records
    from .sweep import run_cases

    measured = run_cases(memory_cases(bundles, threads, n_depth, n_gen), repetitions, warmup, desc="memory",
                         thermal=thermal)
    return measured + state_records(bundles, n_depth, n_gen, measured)


@measurement(lambda depths: dict(max_tokens=32768))
@main.command()
@bench_command
@click.option("--data", default="shakespeare", show_default=True,
              help="corpus name (shakespeare, hf:NAME) or a text FILE")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="split of the corpus, as training cut it [default: test; a FILE: the whole file]")
@click.option("--window", default=256, show_default=True, type=click.IntRange(2),
              help="most tokens one prediction sees (the same rule for both families)")
@click.option("--stride", default=None, type=click.IntRange(1),
              help="tokens scored per window [default: window/2; = window: disjoint windows]")
@click.option("--carry-state", is_flag=True,
              help="SSM bundles carry their state through the whole text (KV bundles keep the window)")
@click.option("--max-tokens", default=None, type=click.IntRange(2), help="score only the text's first N tokens")
@click.option("--max-bytes", default=None, type=click.IntRange(1),
              help="score only the text's first N bytes, cut after a newline: the same text for every vocabulary")
@click.option("--reference", default=None, type=click.Path(path_type=str),
              help="bundle (one of BUNDLES) to give the others' bits/byte change, KL(reference || bundle) and top-1 agreement against")
@click.option("--retrieval/--no-retrieval", default=True, show_default=True,
              help="bundles with a kNN datastore are also scored with retrieval mixed in (rows test '...+knn')")
@click.option("--retrieval-k", default=None, type=click.IntRange(1), help="neighbours [default: the datastore's]")
@click.option("--retrieval-lambda", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="weight of the kNN distribution [default: the datastore's, tuned on val]")
@click.option("--retrieval-temperature", default=None, type=click.FloatRange(0, min_open=True),
              help="softmax temperature over neighbour scores [default: the datastore's]")
@accepts_gguf
def quality(bundles, threads, repetitions, warmup, data, split, window, stride, carry_state, max_tokens, max_bytes,
            reference, retrieval, retrieval_k, retrieval_lambda, retrieval_temperature):
    """Loss, perplexity and bits/byte of each BUNDLE through onnxruntime, or .gguf through llama.cpp (run once)."""
    from . import llamacpp
    from .quality import first_bytes, load_text, quality_records

    ggufs = [b for b in bundles if isinstance(b, llamacpp.GgufModel)]
    bundles = [b for b in bundles if not isinstance(b, llamacpp.GgufModel)]
    if reference is not None and all(os.path.normpath(reference) != os.path.normpath(str(b.path)) for b in bundles):
        raise UsageError(f"--reference {reference} is not one of the ONNX bundles measured")
    if stride is not None and stride > window:
        raise UsageError(f"--stride {stride} is larger than --window {window}")
    if ggufs and carry_state:
        raise UsageError("--carry-state applies to ONNX bundles; a .gguf is scored with the window rule")
    mix = dict(k=retrieval_k, lam=retrieval_lambda, temperature=retrieval_temperature) if retrieval else None
    records = quality_records(bundles, threads[0], data, split, window, stride, carry_state, max_tokens, reference,
                              mix, max_bytes=max_bytes) if bundles else []
    if ggufs:
        docs, split = load_text(data, split)
        docs = first_bytes(docs, max_bytes) if max_bytes is not None else docs
        records += llamacpp.quality_records(ggufs, threads[0], docs, data, split, window, stride or max(1, window // 2),
                                            max_tokens, max_bytes)
    return records


@measurement(lambda depths: dict(n_depth=_span(depths)))
@main.command()
@bench_command
@n_depth_option((0, 128, 2048), help="tokens of context before the decoded token (list)")
def flops(bundles, threads, repetitions, warmup, n_depth):
    """FLOPs per decoded token of each BUNDLE at each depth: counted from the graph and analytic."""
    from .flops import flops_records

    return flops_records(bundles, n_depth)


@measurement(lambda depths: dict(n_prompt=[128], n_gen=[64], n_depth=[0], min_time=1.0, idle_s=2.0))
@main.command()
@bench_command
@n_prompt_option((128,))
@n_gen_option((64,))
@n_depth_option((0,))
@click.option("--energy-backend", type=click.Choice(ENERGY_BACKENDS), default="auto", show_default=True,
              help="auto: the first of powercap, pi5-pmic, perf that reads here")
@click.option("--energy-domains", default=None,
              help="powercap/perf/pyrapl domains, comma-separated: package,dram,core,uncore,psys "
                   "[default: package,dram; perf: package]")
@click.option("--min-time", default=2.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="seconds each measurement window lasts at least (the loop repeats inside it)")
@click.option("--idle", "idle_s", default=3.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="seconds of idle baseline before and after the sweep")
@click.option("--sample-interval", default=None, type=click.FloatRange(0, min_open=True),
              help="background sampling interval, s [default: powercap: a quarter of the fastest wrap "
                   "time, at most 1 s; pi5-pmic: 0.1]")
@click.option("--estimate", is_flag=True,
              help="without a counter, also estimate joules from CPU time (stored estimated: true, shown (est.))")
@click.option("--tdp-per-core-w", default=10.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="the assumed watts per busy core that --estimate uses")
@click.option("--powercap-root", default="/sys/class/powercap", show_default=True,
              help="where the powercap zones are (another sysfs mount, or a test tree)")
@click.option("--vcgencmd", default="vcgencmd", show_default=True,
              help="the vcgencmd to run (pi5-pmic; and get_throttled for every backend)")
@paced
def energy(bundles, threads, repetitions, warmup, n_prompt, n_gen, n_depth, energy_backend, energy_domains,
           min_time, idle_s, sample_interval, estimate, tdp_per_core_w, powercap_root, vcgencmd, thermal):
    """Joules per token (gross, net of idle) for prefill and decode; CPU time per token always."""
    from .energy import EnergyOptions, run_energy

    domains = tuple(d.strip() for d in energy_domains.split(",") if d.strip()) if energy_domains else None
    opts = EnergyOptions(energy_backend, domains, min_time, idle_s, sample_interval, estimate, tdp_per_core_w,
                         powercap_root, vcgencmd)
    records = run_energy(_targets(bundles, threads), n_prompt, n_gen, n_depth, repetitions, warmup, opts,
                         thermal=thermal)
    note = next((r.extra["energy"] for r in records if "energy" in r.extra), None)
    if note:
        click.echo(f"energy: {note}", err=True)
    return records


@measurement(lambda depths: dict(n_gen=32))
@main.command()
@bench_command
@click.option("-c", "--clients", type=IntList(1), default="1,4,16", show_default=True, metavar="N[,N...]",
              help="clients sending at once (list)")
@click.option("-p", "--n-prompt", default=128, show_default=True, type=click.IntRange(1), help="prompt tokens per request")
@click.option("-n", "--n-gen", default=64, show_default=True, type=click.IntRange(1), help="tokens generated per request")
@click.option("--chat-turns", default=10, show_default=True, type=click.IntRange(0),
              help="turns of the chat timed with and without a session (0 skips it)")
@click.option("--chat-gen", default=16, show_default=True, type=click.IntRange(1), help="max_tokens of each chat reply")
@click.option("--parallel", default=None, type=click.IntRange(1), help="itera-serve --parallel [default: its own]")
@click.option("--batch/--no-batch", default=True, show_default=True,
              help="itera-serve --batch/--no-batch: one graph call per round for the decoding requests, or one each")
@click.option("--url", default=None, help="measure this running itera-serve (serving the BUNDLES under their folder "
                                          "names) instead of starting one per thread count")
def serve(bundles, threads, repetitions, warmup, clients, n_prompt, n_gen, chat_turns, chat_gen, parallel, batch, url):
    """TTFT and tokens/s of itera-serve on loopback: N clients at once; a chat with and without a session."""
    from .serve import serve_records

    return serve_records(bundles, threads, repetitions, warmup, clients, n_prompt, n_gen, chat_turns, chat_gen,
                         parallel, url, batch)


@main.command()
@click.argument("results", nargs=-1, type=click.Path(path_type=str))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="folder for report.md, its PNG plots and claims.json")
@click.option("--runs", multiple=True, type=click.Path(path_type=str),
              help="training run folder (itera-train --out) to draw curves of; repeat for several")
@click.option("--baseline", default=None, help="bundle the claims are against [default: the first baseline-family one]")
def report(results, out_dir, runs, baseline):
    """Markdown report with plots from RESULTS (record files or results folders) and training runs."""
    from .report import render
    from .results import load_results

    records, reasons = load_results(results)
    try:
        path = render(records, out_dir, runs=runs, reasons=reasons, baseline=baseline, sources=[*results, *runs])
    except OSError as e:  # the report folder: not writable, disk full
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    click.echo(f"report: {path}")


@main.command()
@click.argument("old", type=click.Path(path_type=str))
@click.argument("new", type=click.Path(path_type=str))
@click.option("-o", "--output", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
def compare(old, new, output):
    """OLD and NEW results (record files or results folders) side by side: speed-up and significance."""
    from .compare import compare as compare_records
    from .compare import format_comparison
    from .results import load_results

    table = compare_records(load_results([old])[0], load_results([new])[0])
    click.echo(format_comparison(table, output))


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--baseline", required=True, type=click.Path(path_type=str), help="the Transformer baseline bundle")
@click.option("--also", "others", multiple=True, type=click.Path(path_type=str),
              help="another Transformer model (bundle at another precision, or .gguf) for the same-engine and "
                   "same-precision speed rows; repeatable")
@click.option("--results", multiple=True, type=click.Path(path_type=str),
              help="record files or results folders with energy / quality (and latency) rows; repeatable")
@threads_option()
@click.option("-r", "--repetitions", default=3, show_default=True, type=click.IntRange(1))
@click.option("-n", "--n-gen", default=32, show_default=True, type=click.IntRange(1), help="decode steps per test")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="measure speed here; --no-measure takes it from --results only")
@click.option("--no-warmup", is_flag=True)
@click.option("-o", "--output", type=click.Choice(["md", "json"]), default="md", show_default=True)
def claims(bundles, baseline, others, results, threads, repetitions, n_gen, measure, no_warmup, output):
    """The four claims (size, speed, energy, quality) of each Itera BUNDLE (or .gguf) against --baseline.

    Speed is measured at each thread count; a claim is judged at the fewest (the edge-device case).
    With --also models, speed also against the Transformer in the same engine and at the same precision.
    """
    import json

    from itera_runtime.options import check_threads

    from .claims import claims_markdown, claims_to_json, measure_claims

    for t in threads:
        check_threads(t)
    tables = measure_claims(list(bundles), baseline, results, threads, repetitions, n_gen, measure, not no_warmup,
                            others=list(others))
    click.echo(json.dumps(claims_to_json(tables), indent=2) if output == "json" else claims_markdown(tables))


@main.command(name="all")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="results folder: one NAME.jsonl per subcommand, the report in report/")
@threads_option()
@click.option("-r", "--repetitions", default=3, show_default=True, type=click.IntRange(1))
@n_depth_option((128, 2048), help="depths for the speed subcommands (those over a bundle's max_seq_len are dropped)")
@click.option("--baseline", default=None, type=click.Path(path_type=str))
@click.option("--runs", multiple=True, type=click.Path(path_type=str), help="training runs to draw in the report")
@click.option("--skip", multiple=True, type=click.Choice(list(MEASUREMENTS)), help="subcommand to leave out; repeatable")
@click.option("--delay", "delay_s", default=None, type=click.FloatRange(0),
              help="seconds between case runs, for every subcommand that sweeps cases")
@click.option("--cool-to", "cool_to_c", default=None, type=float, metavar="CELSIUS",
              help="before each case run, wait until the CPU/SoC is below this (subcommands that sweep cases)")
def all_(bundles, out_dir, threads, repetitions, n_depth, baseline, runs, skip, delay_s, cool_to_c):
    """Every measuring subcommand on the BUNDLEs with small defaults, then the report."""
    from pathlib import Path

    from itera_runtime.bundle import load_bundle

    from .curves import load_runs
    from .llamacpp import is_gguf
    from .report import check_report_folder, render
    from .suite import check_results_folder, collect, quantization_reference, run_all

    load_runs(runs)  # a bad run folder is refused before minutes of measuring
    loaded = [load_bundle(b) for b in bundles if not is_gguf(b)]
    depths = [d for d in n_depth if all(b.fits(d + 512) for b in loaded)]  # room for pp512 after the depth
    if not depths:
        limit = min(b.max_seq_len for b in loaded if b.max_seq_len)
        raise UsageError(f"every depth in {IntList.render(n_depth)} leaves no room for 512 prompt tokens in the "
                         f"bundles' max_seq_len {limit}")
    shared = {k: v for k, v in (("delay_s", delay_s), ("cool_to_c", cool_to_c)) if v is not None}
    reference = quantization_reference(loaded)
    options = {}
    if reference is not None and "quality" in MEASUREMENTS:
        options["quality"] = {**MEASUREMENTS["quality"].small(depths), "reference": str(reference.path)}
    invocations = suite(list(bundles), threads, repetitions, depths, baseline, skip, options, shared)
    check_results_folder(out_dir, invocations)  # a user's files are refused before minutes of measuring
    check_report_folder(Path(out_dir) / "report")
    status = run_all(invocations, out_dir, log=lambda m: click.echo(m, err=True))
    records, reasons = collect(out_dir, status)
    try:
        path = render(records, Path(out_dir) / "report", runs=runs, reasons=reasons, baseline=baseline,
                      sources=[out_dir, *runs])
    except OSError as e:
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    click.echo(f"report: {path}")
    if not any(v == "ok" for v in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
