"""Prompt processing and decode speed, timed the way the generate loop runs.

Tests, named as llama-bench names them:
- `pp{n}` (at depth d: `pp{n}@d{d}`): prefill n prompt tokens after d tokens of context,
  from the call until the state is ready (`LoopTiming.prefill_s`); tokens/s = n / that time.
  Time to first token (prefill plus sampling the first token) is recorded beside it.
- `tg{n}` (`tg{n}@d{d}`): n decode steps, each `Decoder.step` plus greedy sampling, after d
  tokens of context (`LoopTiming.decode_s`: the same clock as itera-run's stats). The loop
  starts from a one-token prompt, so depth 0 and depth 1 time the same thing.
- `pp{p}+tg{g}` (`...@d{d}`, llama-bench's `-pg`): one request, p prompt tokens then g decode
  steps, tokens/s = (p + g) / (time to first token + decode time); its time to first token
  (prefill plus sampling the first token) is a row of its own, `time_to_first_token` in ms.
- `step@d{d}` (itera-bench step): the raw decode step alone (no sampling), µs per token;
  the process's CPU time per step beside it (`cpu_us_per_step`: all threads).

The context is real text (a passage of Hamlet, repeated to length). The state after the
depth tokens is computed once per case and reused, since prefill does not consume it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from itera_runtime.bundle import Bundle, ContextError
from itera_runtime.generate import LoopTiming, generate_tokens
from itera_runtime.sampling import Sampler, SamplingConfig
from itera_runtime.session import ModelSession, State

from .record import Record
from .sweep import Case, Sample, bundle_fields

CONTEXT_TEXT = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
    "And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\nThat flesh is heir to: 'tis a consummation\n"
    "Devoutly to be wish'd. To die, to sleep;\nTo sleep, perchance to dream—ay, there's the rub:\n"
    "For in that sleep of death what dreams may come,\nWhen we have shuffled off this mortal coil,\n"
    "Must give us pause—there's the respect\nThat makes calamity of so long life.\n"
)
GREEDY = SamplingConfig(temperature=0)


class Target:
    """A bundle loaded at one thread count: session and real context tokens, made once."""

    def __init__(self, bundle: Bundle, threads: int | None, device: str = "cpu"):
        self.bundle = bundle
        self.threads = threads
        self.session = ModelSession(bundle, device=device, threads=threads)
        tokenizer = bundle.load_tokenizer()
        self._text_ids = np.asarray(tokenizer.encode(CONTEXT_TEXT).ids, dtype=np.int64)
        self._states: dict[int, State | None] = {}

    def context(self, n: int) -> np.ndarray:
        """The first n tokens of the (repeated) context text."""
        return np.resize(self._text_ids, n)

    def state_after(self, n: int) -> State | None:
        """State after the first n context tokens (None for n = 0), computed once."""
        if n not in self._states:
            self._states[n] = self.session.prefill(self.context(n))[1] if n else None
        return self._states[n]

    def template(self, kind: str, test: str, metric: str, unit: str, higher_is_better: bool = True,
                 **how) -> Record:
        return Record(kind=kind, test=test, metric=metric, unit=unit, higher_is_better=higher_is_better,
                      n_threads=self.threads, ort_settings=dict(self.session.settings),
                      **bundle_fields(self.bundle, self.session.graph_set), **how)


# Deepest context a case may reach. The SSM has no context limit, so without this `-d 99999999`
# would prefill a hundred million tokens before its first repetition (hours, unannounced); the
# Transformer stops at its own max_seq_len well before.
MAX_BENCH_CONTEXT = 131_072


def check_depth(bundle: Bundle, n_depth: int, n_tokens: int) -> None:
    """Refuse a context longer than the model was built for (the KV cache would still grow), or
    than MAX_BENCH_CONTEXT for a model without a limit."""
    bundle.check_context(n_depth + n_tokens, f"depth {n_depth} + {n_tokens} tokens")
    if n_depth + n_tokens > MAX_BENCH_CONTEXT:
        raise ContextError(f"{bundle.path}: depth {n_depth:,} + {n_tokens:,} tokens exceeds itera-bench's "
                           f"{MAX_BENCH_CONTEXT:,}-token limit for a model without a context limit (each case "
                           "prefills its whole depth before it is timed); give a smaller -d")


def _name(kind: str, n: int, depth: int) -> str:
    return f"{kind}{n}" + (f"@d{depth}" if depth else "")


def prompt_case(target: Target, n_prompt: int, n_depth: int) -> Case:
    check_depth(target.bundle, n_depth, n_prompt)
    sampler = Sampler(GREEDY)

    def run() -> Sample:
        ids = target.context(n_depth + n_prompt)[n_depth:]
        timing = LoopTiming()
        for _ in generate_tokens(target.session, ids, 1, sampler, timing, state=target.state_after(n_depth)):
            pass
        return Sample(n_prompt / timing.prefill_s, int(timing.prefill_s * 1e9),
                      {"ttft_ms": timing.first_token_s * 1e3})

    return Case(target.template("latency", _name("pp", n_prompt, n_depth), "tokens_per_s", "tok/s",
                                n_prompt=n_prompt, n_depth=n_depth), run)


def gen_case(target: Target, n_gen: int, n_depth: int) -> Case:
    check_depth(target.bundle, n_depth, n_gen + 1)
    sampler = Sampler(GREEDY)
    start = max(n_depth, 1)

    def run() -> Sample:
        timing = LoopTiming()
        prompt = target.context(start)[start - 1:]
        for _ in generate_tokens(target.session, prompt, n_gen + 1, sampler, timing,
                                 state=target.state_after(start - 1)):
            pass
        return Sample(timing.decode_tokens_per_s, int(timing.decode_s * 1e9))

    return Case(target.template("latency", _name("tg", n_gen, n_depth), "tokens_per_s", "tok/s",
                                n_gen=n_gen, n_depth=n_depth), run)


def request_case(target: Target, n_prompt: int, n_gen: int, n_depth: int) -> Case:
    """Prompt then generation as one request; each repetition's TTFT kept for `ttft_records`."""
    check_depth(target.bundle, n_depth, n_prompt + n_gen + 1)
    sampler = Sampler(GREEDY)

    def run() -> Sample:
        ids = target.context(n_depth + n_prompt)[n_depth:]
        timing = LoopTiming()
        for _ in generate_tokens(target.session, ids, n_gen + 1, sampler, timing, state=target.state_after(n_depth)):
            pass
        total = timing.first_token_s + timing.decode_s
        return Sample((n_prompt + n_gen) / total, int(total * 1e9),
                      {"ttft_ms": timing.first_token_s * 1e3, "ttft_ns": int(timing.first_token_s * 1e9)})

    test = f"pp{n_prompt}+tg{n_gen}" + (f"@d{n_depth}" if n_depth else "")
    return Case(target.template("latency", test, "tokens_per_s", "tok/s", n_prompt=n_prompt, n_gen=n_gen,
                                n_depth=n_depth, method="one request: prefill, then decode steps"), run)


def ttft_records(cases: list[Case], records: list[Record]) -> list[Record]:
    """The time-to-first-token row of each measured request case, from its repetitions."""
    measured = {id(r) for r in records}
    out = []
    for case in cases:
        if id(case.record) not in measured or not case.extras or "ttft_ns" not in case.extras[0]:
            continue
        r = dataclasses.replace(case.record, metric="time_to_first_token", unit="ms", higher_is_better=False,
                                samples=[e["ttft_ms"] for e in case.extras],
                                samples_ns=[e["ttft_ns"] for e in case.extras],
                                extra={}, method="prefill plus sampling the first token")
        out.append(r)
    return out


def step_case(target: Target, n_steps: int, n_depth: int) -> Case:
    """The raw decode step (no sampling): what the graph and the session wrapper cost."""
    check_depth(target.bundle, n_depth, n_steps + 1)
    start = max(n_depth, 1)

    def run() -> Sample:
        _, state = target.session.prefill(target.context(start)[start - 1:], target.state_after(start - 1))
        step = target.session.decoder(state).step
        tokens = target.context(start + n_steps)[start:].tolist()
        t, cpu = time.perf_counter_ns(), time.process_time_ns()
        for token in tokens:
            step(token)
        ns, cpu = time.perf_counter_ns() - t, time.process_time_ns() - cpu
        # CPU time of every thread of the process: what a step costs the machine, which on a
        # shared box varies less than wall time and shows threads that spin or wait.
        return Sample(ns / 1e3 / n_steps, ns, {"cpu_us_per_step": cpu / 1e3 / n_steps})

    return Case(target.template("step", f"step@d{n_depth}", "us_per_step", "µs", higher_is_better=False,
                                n_gen=n_steps, n_depth=n_depth), run)


def latency_cases(targets: list, n_prompt: list[int], n_gen: list[int], n_depth: list[int],
                  prompt=prompt_case, gen=gen_case, n_pg: Sequence[tuple[int, int]] = ()) -> list[Case]:
    """The product of the lists for every target, llama-bench's order: pp tests, tg tests, pg tests.

    prompt/gen: the case builders of the engine (bench/llamacpp.py passes its own).
    """
    cases = []
    for target in targets:
        cases += [prompt(target, p, d) for p in n_prompt if p for d in n_depth]
        cases += [gen(target, n, d) for n in n_gen if n for d in n_depth]
        cases += [request_case(target, p, g, d) for p, g in n_pg for d in n_depth]
    return cases
