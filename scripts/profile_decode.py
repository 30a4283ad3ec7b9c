"""Where the time of one decode step goes: onnxruntime vs the Python around it.

Runs the real generate loop (`Generator.generate`) and wraps, per step, the onnxruntime call
(`InferenceSession.run_with_iobinding`), `Decoder.step` and the sampler with
perf_counter accumulators. Everything outside the onnxruntime call is Python overhead:

    loop      = decode phase of GenerationStats (model step + sampling + detokenisation)
    ort       = time inside run_with_iobinding / run_with_ort_values (Python wrapper included)
    session   = Decoder.step minus ort (token write, KV rebinding)
    sampler   = Sampler.__call__
    rest      = loop - ort - session - sampler (streamer, stop strings, generator plumbing)
    overhead  = (loop - ort) / ort

Timers add about 0.2 us per wrapped call, small against steps of 100+ us.
Prompts are random token ids, so any tokenizer works; decode tok/s comes from a second,
untimed-wrapper run so the wrappers do not bias it.

    python scripts/profile_decode.py BUNDLE [BUNDLE...] --prompt-len 16,512 --threads 1,2 --steps 256
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import click
from itera_runtime import Generator, SamplingConfig
from itera_runtime.sampling import Sampler

PASSAGE = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
           "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ")
SAMPLINGS = {
    "greedy": SamplingConfig(temperature=0),
    "topk-topp": SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, seed=0),
}


class Timers:
    def __init__(self):
        self.ort = self.session = self.sampler = 0.0
        self.calls = 0
        self.in_decode = False  # only decode steps count; prefill is not a per-token cost


def _wrap(gen: Generator, timers: Timers):
    """Install accumulating wrappers on this generator's session and on Sampler; return an undo."""
    perf = time.perf_counter
    sessions = list({id(s): s for s in gen.session.graphs.values()}.values())
    for sess in sessions:
        run = sess.run_with_iobinding

        def timed_run(binding, run_options=None, _run=run):
            t = perf()
            _run(binding, run_options)
            if timers.in_decode:
                timers.ort += perf() - t

        sess.run_with_iobinding = timed_run
        run_values = sess.run_with_ort_values

        def timed_run_values(names, feeds, run_options=None, _run=run_values):
            t = perf()
            out = _run(names, feeds, run_options)
            if timers.in_decode:
                timers.ort += perf() - t
            return out

        sess.run_with_ort_values = timed_run_values
    make_decoder = gen.session.decoder

    def timed_decoder(state):
        decoder = make_decoder(state)
        step = decoder.step

        def timed_step(token):
            timers.in_decode = True
            t = perf()
            out = step(token)
            timers.in_decode = False
            timers.session += perf() - t
            timers.calls += 1
            return out

        decoder.step = timed_step
        return decoder

    gen.session.decoder = timed_decoder
    call = Sampler.__call__

    def timed_sample(self, logits, history=()):
        t = perf()
        out = call(self, logits, history)
        timers.sampler += perf() - t
        return out

    Sampler.__call__ = timed_sample

    def undo():
        for sess in sessions:
            del sess.run_with_iobinding
            del sess.run_with_ort_values
        del gen.session.decoder
        Sampler.__call__ = call

    return undo


def profile(gen: Generator, prompt_len: int, steps: int, sampling: SamplingConfig, repeats: int) -> dict:
    """One bundle/threads/prompt/sampling cell: overhead breakdown and decode tok/s."""
    ids = gen.encode(PASSAGE * (1 + 4 * prompt_len // len(PASSAGE)))[:prompt_len]
    prompt_text = gen.tokenizer.decode(ids)
    # Warm-up at full length: the first run of each KV-cache size allocates in onnxruntime.
    gen.generate(prompt_text, steps + 1, sampling).finish()

    # Overhead: decode phase only (the prefill call is not a per-token cost).
    timers = Timers()
    undo = _wrap(gen, timers)
    try:
        stats = gen.generate(prompt_text, steps + 1, sampling).finish()
    finally:
        undo()
    loop = stats.decode_s
    ort_decode = timers.ort
    session = timers.session - ort_decode
    rest = loop - ort_decode - session - timers.sampler
    per = 1e6 / timers.calls

    tps = []
    for _ in range(repeats):
        tps.append(gen.generate(prompt_text, steps + 1, sampling).finish().decode_tokens_per_s)
    return {
        "prompt_tokens": stats.prompt_tokens, "decode_steps": timers.calls,
        "us_per_token": {"loop": loop * per, "ort": ort_decode * per, "session_py": session * per,
                         "sampler": timers.sampler * per, "rest": rest * per},
        "python_overhead_pct_of_ort": 100 * (loop - ort_decode) / ort_decode,
        "decode_tokens_per_s_median": statistics.median(tps),
        "decode_tokens_per_s_spread": [min(tps), max(tps)],
    }


@click.command()
@click.argument("bundles", nargs=-1, required=True)
@click.option("--prompt-len", default="16,512", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option("--steps", default=256, show_default=True, help="Decode steps per run.")
@click.option("--sampling", "samplings", default="greedy,topk-topp", show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Runs for the tok/s median.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per cell instead of a table.")
def main(bundles, prompt_len, threads, steps, samplings, repeats, as_json):
    """Profile the decode loop of each BUNDLE over prompt lengths x threads x samplings."""
    header = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "python": sys.version.split()[0],
              "command": " ".join(sys.argv)}
    click.echo(json.dumps(header), err=True)
    if not as_json:
        click.echo("| bundle | family | threads | prompt | sampling | loop us/tok | ort us/tok | session py | "
                   "sampler | rest | py overhead % of ort | decode tok/s (median [min, max]) |")
        click.echo("|" + "---|" * 12)
    for bundle in bundles:
        for t in (int(x) for x in threads.split(",")):
            gen = Generator(bundle, threads=t)
            for p in (int(x) for x in prompt_len.split(",")):
                for name in samplings.split(","):
                    r = profile(gen, p, steps, SAMPLINGS[name], repeats)
                    row = {"bundle": bundle, "family": gen.family, "threads": t, "sampling": name, **r}
                    if as_json:
                        click.echo(json.dumps(row))
                        continue
                    u = r["us_per_token"]
                    lo, hi = r["decode_tokens_per_s_spread"]
                    click.echo(f"| {os.path.basename(bundle.rstrip('/'))} | {gen.family} | {t} | "
                               f"{r['prompt_tokens']} | {name} | {u['loop']:.0f} | {u['ort']:.0f} | "
                               f"{u['session_py']:.1f} | {u['sampler']:.1f} | {u['rest']:.1f} | "
                               f"{r['python_overhead_pct_of_ort']:.1f} | "
                               f"{r['decode_tokens_per_s_median']:.0f} [{lo:.0f}, {hi:.0f}] |")


if __name__ == "__main__":
    main()
