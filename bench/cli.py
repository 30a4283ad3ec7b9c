"""itera-bench: measured, reproducible comparisons of bundles (no torch).

    itera-bench latency BUNDLE... -p 512 -n 64 -d 128,2048 -t 1,2 -r 5 -o md
    itera-bench step BUNDLE... -d 128,2048            # the raw decode step, µs per token
    itera-bench profile BUNDLE... -d 128 -t 1         # per op type / layer / Python overhead
    itera-bench latency BUNDLE... --host pi@pi5.local # any subcommand, on a device over ssh

List options sweep their product, as llama-bench's do; bundles are visited round-robin
across repetitions; every row carries its provenance. Errors a user can cause end in one
`error:` line and exit 1; Ctrl-C prints the rows already measured and exits 130.
"""

from __future__ import annotations

import functools
import sys

import click

from .record import FORMATS, Record, format_records


def _ints(text: str, allow_zero: bool = False) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    low = 0 if allow_zero else 1
    if not values or min(values) < low:
        raise click.BadParameter(f"expected integers >= {low}, got {text!r}")
    return values


def _list(allow_zero: bool = False):
    return lambda ctx, param, value: _ints(value, allow_zero)


def _fail(message: str, code: int = 1) -> None:
    click.echo("error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


def bench_command(fn):
    """Shared options and error handling: bundles, threads, repetitions, warm-up, output, baseline."""

    @click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=str))
    @click.option("-t", "--threads", default="1", show_default=True, callback=_list(),
                  help="onnxruntime intra-op threads (list)")
    @click.option("-r", "--repetitions", default=5, show_default=True, type=click.IntRange(1))
    @click.option("--no-warmup", is_flag=True, help="skip the untimed first run of each case")
    @click.option("-o", "--output", type=click.Choice(FORMATS), default="md", show_default=True)
    @click.option("--baseline", default=None, type=click.Path(path_type=str),
                  help="bundle the ratios are against [default: the first baseline-family bundle]")
    @click.option("--host", "hosts", multiple=True, metavar="SSH_TARGET",
                  help="run on this device over ssh instead (repeatable; `local` adds this machine)")
    @click.option("--device-profile", "device_profiles", multiple=True, metavar="NAME",
                  help="run on the device of this profile (a name, or a .toml file)")
    @click.option("--fleet", default=None, type=click.Path(dir_okay=False, path_type=str),
                  help="run on every host of this fleet file, in parallel")
    @functools.wraps(fn)
    def wrapper(bundles, threads, repetitions, no_warmup, output, baseline, hosts, device_profiles, fleet, **kw):
        from itera_runtime.bundle import BundleError, load_bundle
        from itera_runtime.session import DeviceError, check_threads

        from .sweep import compare_to_baseline

        remote_errors: tuple = ()
        if hosts or device_profiles or fleet:  # devices/ is imported only when asked for
            from itera_devices.remote import ERRORS as remote_errors
        code = 0
        try:
            for t in threads:
                check_threads(t)
            devices, run_here = [], True
            records: list[Record] = []
            if remote_errors:
                from itera_devices.remote import bench_on_devices, select_devices

                devices, run_here = select_devices(hosts, device_profiles, fleet)
            loaded = [_load(b, fn) for b in bundles]  # verified once, before any progress
            if baseline is not None and baseline not in bundles:
                raise ValueError(f"--baseline {baseline} is not one of the bundles measured")
            if devices:
                records, code = bench_on_devices(click.get_current_context(), loaded, devices, threads)
            if run_here and code != 130:
                records = fn(loaded, threads=threads, repetitions=repetitions, warmup=not no_warmup, **kw) + records
        except (BundleError, DeviceError, ValueError, OSError, *remote_errors) as e:
            _fail(str(e))
        compare_to_baseline(records, baseline)
        click.echo(format_records(records, output))
        if any(r.interrupted for r in records):
            code = 130
        if code:
            sys.exit(code)

    return wrapper


def accepts_gguf(fn):
    """Mark a subcommand that also measures .gguf files through llama.cpp (put under @bench_command)."""
    fn.accepts_gguf = True
    return fn


def _load(path: str, fn):
    """A bundle, verified; or, for subcommands that take one, a .gguf model for llama.cpp."""
    from itera_runtime.bundle import load_bundle

    from .llamacpp import GgufModel, is_gguf

    if is_gguf(path):
        if not getattr(fn, "accepts_gguf", False):
            raise ValueError(f"{path}: a GGUF file is measured by `itera-bench latency` only")
        return GgufModel(path)
    return load_bundle(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Benchmark exported bundles; every row carries its provenance."""


def _targets(bundles, threads):
    from .latency import Target

    return [Target(b, t) for b in bundles for t in threads]


def _latency_cases(bundles, threads, n_prompt, n_gen, n_depth, flash_attn="auto"):
    """ONNX bundles and llama.cpp models in the order given, each at every thread count."""
    from . import latency, llamacpp

    cases = []
    for b in bundles:
        for t in threads:
            if isinstance(b, llamacpp.GgufModel):
                cases += llamacpp.latency_cases([llamacpp.GgufTarget(b, t, flash_attn)], n_prompt, n_gen, n_depth)
            else:
                cases += latency.latency_cases([latency.Target(b, t)], n_prompt, n_gen, n_depth)
    return cases


@main.command()
@bench_command
@click.option("-p", "--n-prompt", default="512", show_default=True, callback=_list(True),
              help="prompt tokens per prefill test (list; 0 skips)")
@click.option("-n", "--n-gen", default="64", show_default=True, callback=_list(True),
              help="decode steps per generation test (list; 0 skips)")
@click.option("-d", "--n-depth", default="128,2048", show_default=True, callback=_list(True),
              help="tokens already in the context (list)")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="llama.cpp (.gguf) only: auto times both and keeps the faster")
@accepts_gguf
def latency(bundles, threads, repetitions, warmup, n_prompt, n_gen, n_depth, flash_attn):
    """Prompt tokens/s (ppN) and decode tokens/s (tgN) of each BUNDLE (or .gguf, in llama.cpp)."""
    from .sweep import run_cases

    cases = _latency_cases(bundles, threads, n_prompt, n_gen, n_depth, flash_attn)
    return run_cases(cases, repetitions, warmup, desc="latency")


@main.command()
@bench_command
@click.option("-n", "--n-steps", default=256, show_default=True, type=click.IntRange(1), help="steps per repetition")
@click.option("-d", "--n-depth", default="128,2048", show_default=True, callback=_list(True))
def step(bundles, threads, repetitions, warmup, n_steps, n_depth):
    """The raw decode step of each BUNDLE (no sampling), µs per token."""
    from .latency import step_case
    from .sweep import run_cases

    cases = [step_case(t, n_steps, d) for t in _targets(bundles, threads) for d in n_depth]
    return run_cases(cases, repetitions, warmup, desc="step")


@main.command()
@bench_command
@click.option("-n", "--n-steps", default=256, show_default=True, type=click.IntRange(1))
@click.option("-d", "--n-depth", default="128", show_default=True, callback=_list(True))
def profile(bundles, threads, repetitions, warmup, n_steps, n_depth):
    """Where a decode step's time goes: op types, layers, Python around onnxruntime."""
    from .profile import profile_bundle

    return [r for b in bundles for t in threads for d in n_depth for r in profile_bundle(b, d, n_steps, t)]


if __name__ == "__main__":
    main()
