"""The generate loop: prompt text in, streamed text out, one loop for both model families.

`ModelSession` hides what differs between families (SSM state or KV cache), so generation
is the same everywhere: tokenize, prefill the prompt (in chunks), then sample a token,
stream its text and decode it with the carried state, until `max_new_tokens` or a stop
string. Sampling (`sampling.py`) and UTF-8-safe detokenisation (`textstream.py`) are their
own small modules; this one only wires them together and times them.

`generate_tokens` is the loop itself and `LoopTiming` its clock: the one definition of
prefill time and decode tokens/s, shared by `GenerationStats`, `itera-bench latency` and the
pipeline's report.

Conventions:
- An empty prompt is generated from a single newline token, i.e. "start of a line";
  `stats.prompt_tokens` is then 1.
- Stop strings are matched in the generated text only (never the prompt). Generation stops
  as soon as the text contains one; the text returned ends right before it. Text that could
  still become a stop string is held back until it cannot.
- Models we train have no end-of-text token, so generation ends by length or stop string; a
  bundle imported from a checkpoint that has one (manifest `special_tokens.eos_token_id`) also
  ends at it, as transformers' `generate` does (the token itself is not in the text).
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as PieceLoop
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import UsageError
from .sampling import Sampler, SamplingConfig
from .session import ModelSession, State
from .textstream import TextStreamer

__all__ = ["Generator", "Generation", "GenerationStats", "LoopTiming", "generate_tokens", "peak_rss_mb"]

STOP_REASONS = ("max_new_tokens", "stop_string", "eos_token")


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far in MiB (None where the OS has no counter).

    A process-lifetime high-water mark, not a per-call one: it includes model loading. On
    Linux it is VmHWM of /proc/self/status, the peak of this process's own memory; getrusage's
    ru_maxrss would also count the parent's memory at fork time (a child of a 600 MB process
    reports at least 600 MB).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
    except ImportError:  # Windows: psutil exposes the peak working set instead
        import psutil

        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
        return None if peak is None else peak / (1 << 20)


@dataclass
class GenerationStats:
    """Timings and counts of one generation.

    time_to_first_token_s runs from the call (tokenization included) to the first sampled
    token. prefill_s and decode_s are `LoopTiming`'s: decode covers the new_tokens - 1
    tokens after the first, each one decode step plus sampling (not detokenisation, stop
    strings or the caller's time between pieces). total_s is the whole call without the
    caller's time.
    """

    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    decode_s: float
    decode_tokens_per_s: float
    total_s: float
    peak_rss_mb: float | None
    stop_reason: str
    text: str

    def as_dict(self, text: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not text:
            del d["text"]
        return d

    def summary(self) -> str:
        """One line for humans, e.g. "[prefill 12 tok 1234 tok/s | decode 64 tok ... ]"."""
        rss = "n/a" if self.peak_rss_mb is None else f"{self.peak_rss_mb:.0f} MB"
        return (f"[prefill {self.prompt_tokens} tok {self.prefill_tokens_per_s:.0f} tok/s | "
                f"decode {self.new_tokens} tok {self.decode_tokens_per_s:.0f} tok/s | "
                f"ttft {self.time_to_first_token_s * 1e3:.1f} ms | peak rss {rss} | {self.stop_reason}]")

@dataclass
class LoopTiming:
    """The generate loop's clock; the one definition of prefill time and decode tokens/s.

    prefill_s: the prefill call(s) over the whole prompt.
    first_token_s: prefill plus sampling the first token.
    decode_s: the decode steps after the first token, each one `Decoder.step` plus one
    sampler call: sampling is inside, detokenisation and the consumer's time are not.
    decode_steps: how many such steps (new tokens - 1).
    """

    prefill_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0


def generate_tokens(session: ModelSession, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int, sampler: Sampler,
                    timing: LoopTiming | None = None, state: State | None = None,
                    after_prefill: Callable[[State], None] | None = None,
                    decoder: Callable[[State], Any] | None = None) -> Iterator[int]:
    """The loop: prefill once, then sample and decode with the carried state.

    Each token is yielded before the next decode step runs, so a consumer that stops early
    never pays for an unused step. `timing` (if given) is filled in as the loop runs.
    state: continue after earlier tokens (default: an empty context); it is not consumed.
    after_prefill: called with the state after the prompt, before decoding consumes it.
    decoder: makes the decoder (anything with `step(token) -> logits`) from the state after the
    prompt, before the first token is yielded (itera-serve's batch takes the state in then);
    default: the session's own, made when the first step is needed.
    """
    timing = timing if timing is not None else LoopTiming()
    perf = time.perf_counter
    start = perf()
    logits, state = session.prefill(prompt_ids, state)
    timing.prefill_s = perf() - start
    if after_prefill is not None:
        after_prefill(state)
    history = list(prompt_ids)  # for the repetition penalty
    token = sampler(logits, history)
    timing.first_token_s = perf() - start
    history.append(token)
    step = decoder(state).step if decoder is not None else None
    yield token
    step = step or session.decoder(state).step
    if sampler.config.greedy and sampler.config.repetition_penalty == 1.0:
        # The greedy hot path: an argmax on the decoder's logits view and nothing else (no
        # history, no sampler call); the same token and nan check as Sampler's greedy branch.
        for _ in range(max_new_tokens - 1):
            t = perf()
            logits = step(token)
            token = int(logits.argmax())
            if logits[token] != logits[token]:
                raise ValueError("cannot sample: logits contain nan")
            timing.decode_s += perf() - t
            timing.decode_steps += 1
            yield token
        return
    for _ in range(max_new_tokens - 1):
        t = perf()
        token = sampler(step(token), history)
        timing.decode_s += perf() - t
        timing.decode_steps += 1
        history.append(token)
        yield token


class Generation:
    """One `Generator.generate` call: iterate it for text pieces as they are produced.

    `.text`, `.stats` and `.token_ids` are complete once iteration has ended; reading
    `.text` or calling `finish()` runs what is left of the generation first. With
    `keep_state`, `.state` is the state after the prompt and the returned text.
    """

    def __init__(self, generator: Generator, prompt: str, prompt_ids: list[int], sampling: SamplingConfig,
                 start_position: int = 0):
        self.generator = generator
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.sampling = sampling  # as used: a seed drawn for an unseeded config is filled in
        self.start_position = start_position  # tokens the state given to generate had seen
        self.token_ids: list[int] = []
        self.stats: GenerationStats | None = None
        self._pieces: PieceLoop[str, None, None] = _whole(iter(()))
        self._after_prompt: State | None = None
        self._state: State | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def finish(self) -> GenerationStats:
        """Run the generation to its end; return its stats."""
        for _ in self:
            pass
        assert self.stats is not None
        return self.stats

    def interrupted(self) -> GenerationStats | None:
        """After a Ctrl-C (KeyboardInterrupt) while iterating: the stats and text of what was
        generated so far (stop_reason "interrupted"); None when it stopped before generating."""
        if self.stats is None:  # the Ctrl-C came between two pieces: stop the loop where it waits
            try:
                self._pieces.throw(KeyboardInterrupt)
            except (KeyboardInterrupt, StopIteration):
                pass
        return self.stats

    @property
    def text(self) -> str:
        return self.finish().text

    @property
    def state(self) -> State:
        """The state after the prompt and the returned text: pass it to the next `generate` to continue.

        It is the state after the prompt with the returned text prefilled on top, i.e. what a
        client that sends prompt + text back would get: the tokens sampled after a stop
        string (and the last token sampled, which no decode step fed) are not in it.
        """
        if self._state is None:
            text = self.finish().text
            if self._after_prompt is None:
                raise ValueError("this generation did not keep its state: call generate(..., keep_state=True)")
            session = self.generator.session
            ids = self.generator.tokenizer.encode(text).ids if text else []
            self._state = session.prefill(ids, self._after_prompt)[1] if ids else self._after_prompt
            self._after_prompt = None
        return self._state


class Generator:
    """A verified bundle, its tokenizer and an onnxruntime session, ready to generate.

    bundle: bundle folder (all files checked against their sha256 first) or a loaded Bundle.
    device: "cpu", "cuda", ... (DeviceError lists what this onnxruntime has).
    threads: onnxruntime intra-op threads; None lets onnxruntime choose.
    graph_set: which of a dual bundle's graph sets to run; None picks the first this
    onnxruntime has the kernels for (`session.graph_set` says which).
    retrieval: mix in the bundle's kNN datastore, with these overrides of its settings
    ({"k", "lam", "temperature"}); None runs the model alone.
    """

    def __init__(self, bundle: str | Path | Bundle, device: str = "cpu", threads: int | None = None,
                 graph_set: str | None = None, retrieval: dict | None = None):
        from .retrieval import open_retriever

        self.bundle: Bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.tokenizer = self.bundle.load_tokenizer()
        self.retriever = open_retriever(self.bundle, **retrieval) if retrieval is not None else None
        self.session = ModelSession(self.bundle, device=device, threads=threads, graph_set=graph_set,
                                    retriever=self.retriever)
        self.device, self.threads = device, threads
        self.last_stats: GenerationStats | None = None
        special = self.bundle.manifest.extra.get("special_tokens")
        eos = special.get("eos_token_id") if isinstance(special, dict) else None
        self.eos_token_id: int | None = eos if isinstance(eos, int) and not isinstance(eos, bool) else None

    @property
    def family(self) -> str:
        return self.bundle.family

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids; an empty prompt becomes a single newline token."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text (str), got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError("prompt is not valid Unicode text (it holds undecodable bytes)") from None
        ids = self.tokenizer.encode(prompt).ids
        return ids if ids else self.tokenizer.encode("\n").ids[:1]

    def _sampler(self, sampling: SamplingConfig | None) -> Sampler:
        sampling = sampling if sampling is not None else SamplingConfig()
        if sampling.seed is None and not sampling.greedy:
            # Record the randomness actually used, so any run can be replayed.
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(32))
        return Sampler(sampling)

    def _check(self, n_prompt: int, max_new_tokens: int, position: int = 0) -> None:
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        before = f"{position} tokens of state + " if position else ""
        self.bundle.check_context(position + n_prompt + max_new_tokens,
                                  f"{before}prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens})")

    def save_state(self, state: State, path: str | Path, meta: dict | None = None) -> Path:
        """Write `state` (e.g. `Generation.state`) to a file tied to this bundle's hash; atomic, no pickle."""
        from .statefile import write_state

        return write_state(path, self.bundle, state.numpy(), state.position, meta)

    def load_state(self, path: str | Path) -> State:
        """A state saved by `save_state` with this same bundle (StateFileError otherwise)."""
        from .statefile import read_state

        saved = read_state(path, self.bundle)
        return self.session.state_kind.from_arrays(saved.arrays, saved.position)

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                     sampling: SamplingConfig | None = None) -> list[int]:
        """New token ids after `prompt_ids` (no text, no stop strings, no stats)."""
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; give at least one token")
        self._check(len(prompt_ids), max_new_tokens)
        return list(generate_tokens(self.session, prompt_ids, max_new_tokens, self._sampler(sampling)))

    def generate(self, prompt: str, max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
                 stop: Sequence[str] = (), stream: bool = True, state: State | None = None,
                 keep_state: bool = False, prompt_ids: Sequence[int] | None = None,
                 decoder: Callable[[State], Any] | None = None) -> Generation:
        """Continue `prompt`; returns a `Generation` to iterate for text pieces.

        sampling: None samples from the plain softmax with a fresh (recorded) seed;
        SamplingConfig(temperature=0) is greedy.
        stop: strings that end the generation; the text ends right before the first one.
        stream: False yields the whole text as one piece at the end.
        state: continue after the text this state has seen (an earlier `Generation.state`, or
        `load_state`); `prompt` is then only the new text. It is not consumed.
        keep_state: make `Generation.state` available (one small copy of the state after the
        prompt; the returned text is prefilled on top when `.state` is first read).
        prompt_ids: `prompt` already tokenized with `encode` (skips tokenizing it again).
        decoder: the decode loop's decoder, made from the state after the prompt (itera-serve's
        batch). Iteration then takes exactly one token per piece, and a piece may be "".
        """
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise UsageError(f"stop strings must be non-empty strings, got {stop!r}")
        start = time.perf_counter()
        ids = self.encode(prompt) if prompt_ids is None else [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("prompt_ids is empty; give at least one token")
        position = state.position if state is not None else 0
        self._check(len(ids), max_new_tokens, position)
        sampler = self._sampler(sampling)
        gen = Generation(self, prompt, ids, sampler.config, position)
        pieces = self._pieces(gen, start, max_new_tokens, sampler, stop, state, keep_state, decoder)
        gen._pieces = pieces if stream else _whole(pieces)
        return gen

    def _pieces(self, gen: Generation, start: float, max_new_tokens: int, sampler: Sampler,
                stop: tuple[str, ...], state: State | None = None, keep_state: bool = False,
                decoder: Callable[[State], Any] | None = None) -> PieceLoop[str, None, None]:
        streamer = TextStreamer(self.tokenizer)
        push = streamer.push
        out = gen.token_ids
        emitted: list[str] = []
        timing = LoopTiming()
        paused = 0.0  # time spent by the caller between pieces, kept out of the stats
        first = None
        held = ""  # decoded text not yet emitted: it may be the start of a stop string
        reason = "max_new_tokens"

        def keep(after_prompt: State) -> None:
            gen._after_prompt = self.session.state_kind.snapshot(after_prompt)

        def stats(end: float, reason: str, text: str) -> GenerationStats:
            n_prompt = len(gen.prompt_ids)
            gen.stats = self.last_stats = GenerationStats(
                prompt_tokens=n_prompt,
                new_tokens=len(out),
                time_to_first_token_s=(first - start) if first is not None else 0.0,
                prefill_s=timing.prefill_s,
                prefill_tokens_per_s=n_prompt / timing.prefill_s if timing.prefill_s > 0 else 0.0,
                decode_s=timing.decode_s,
                decode_tokens_per_s=timing.decode_tokens_per_s,
                total_s=end - start - paused,
                peak_rss_mb=peak_rss_mb(),
                stop_reason=reason,
                text=text,
            )
            return gen.stats

        every_token = decoder is not None
        try:
            for token in generate_tokens(self.session, gen.prompt_ids, max_new_tokens, sampler, timing, state,
                                         keep if keep_state else None, decoder):
                if first is None:
                    first = time.perf_counter()
                if token == self.eos_token_id:
                    reason = "eos_token"
                    break
                out.append(token)
                piece = push(token)
                if stop:
                    piece, held, hit = _hold_back(held + piece, stop)
                    if hit:
                        reason = "stop_string"
                if piece or every_token:
                    emitted.append(piece)
                    t = time.perf_counter()
                    yield piece
                    paused += time.perf_counter() - t
                if reason == "stop_string":
                    break
        except KeyboardInterrupt:  # Ctrl-C: the stats of what was made (Generation.interrupted), then on up
            stats(time.perf_counter(), "interrupted", "".join(emitted) + held)
            raise
        end = time.perf_counter()

        if reason != "stop_string":  # what was held back for a stop string that never came
            tail = held + streamer.flush()
            if stop:
                cut = _first_stop(tail, stop)
                if cut is not None:
                    tail, reason = tail[:cut], "stop_string"
            if tail:
                emitted.append(tail)
                yield tail

        stats(end, reason, "".join(emitted))


def _whole(pieces: Iterator[str]) -> PieceLoop[str, None, None]:
    """The non-streaming form: everything as one piece (nothing runs before iteration)."""
    text = "".join(pieces)
    if text:
        yield text


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _hold_back(text: str, stop: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split pending text into (emit now, hold back, stop hit).

    Held back is the longest tail of `text` that is the start of some stop string. Since
    whatever was emitted before never ended in such a tail, any stop string that completes
    later starts inside `text`, so only `text` has to be searched.
    """
    cut = _first_stop(text, stop)
    if cut is not None:
        return text[:cut], "", True
    longest = max(len(s) for s in stop) - 1
    for k in range(min(longest, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return text[:-k], tail, False
    return text, "", False

