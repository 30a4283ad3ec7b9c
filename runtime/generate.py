"""The generate loop: prompt text in, streamed text out, one loop for both model families.

`ModelSession` hides what differs between families (SSM state or KV cache), so generation
is the same everywhere: tokenize, prefill the whole prompt in one call, then sample a token,
stream its text and decode it with the carried state, until `max_new_tokens` or a stop
string. Sampling (`sampling.py`) and UTF-8-safe detokenisation (`textstream.py`) are their
own small modules; this one only wires them together and times them.

Conventions:
- An empty prompt is generated from a single newline token, i.e. "start of a line";
  `stats.prompt_tokens` is then 1.
- Stop strings are matched in the generated text only (never the prompt). Generation stops
  as soon as the text contains one; the text returned ends right before it. Text that could
  still become a stop string is held back until it cannot.
- The models have no end-of-text token, so generation ends only by length or stop string.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from .bundle import Bundle, BundleError, load_bundle
from .sampling import Sampler, SamplingConfig
from .session import ModelSession
from .textstream import TextStreamer

__all__ = ["Generator", "Generation", "GenerationStats", "peak_rss_mb"]

STOP_REASONS = ("max_new_tokens", "stop_string")


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far in MiB (None where the OS has no counter).

    A process-lifetime high-water mark, not a per-call one: it includes model loading.
    """
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
    token. Decode covers the new_tokens - 1 tokens after the first: model step, sampling and
    detokenisation, but not the time the caller spends between pieces.
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


class Generation:
    """One `Generator.generate` call: iterate it for text pieces as they are produced.

    `.text`, `.stats` and `.token_ids` are complete once iteration has ended; reading
    `.text` or calling `finish()` runs what is left of the generation first.
    """

    def __init__(self, prompt: str, prompt_ids: list[int], sampling: SamplingConfig):
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.sampling = sampling  # as used: a seed drawn for an unseeded config is filled in
        self.token_ids: list[int] = []
        self.stats: GenerationStats | None = None
        self._pieces: Iterator[str] = iter(())

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

    @property
    def text(self) -> str:
        return self.finish().text


class Generator:
    """A verified bundle, its tokenizer and an onnxruntime session, ready to generate.

    bundle_path: bundle folder (all files checked against their sha256 first).
    device: "cpu", "cuda", ... (DeviceError lists what this onnxruntime has).
    threads: onnxruntime intra-op threads; None lets onnxruntime choose.
    """

    def __init__(self, bundle_path: str | Path, device: str = "cpu", threads: int | None = None):
        self.bundle: Bundle = load_bundle(bundle_path)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.bundle.tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise BundleError(f"{self.bundle.tokenizer_path}: not a readable tokenizer ({e})") from None
        vocab = self.bundle.vocab_size
        if vocab is not None and self.tokenizer.get_vocab_size() > vocab:
            raise BundleError(f"{self.bundle.path}: tokenizer has {self.tokenizer.get_vocab_size()} ids, "
                              f"more than the model's vocab_size {vocab}")
        self.session = ModelSession(self.bundle, device=device, threads=threads)
        self.device, self.threads = device, threads
        self.last_stats: GenerationStats | None = None

    @property
    def family(self) -> str:
        return self.bundle.family

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids; an empty prompt becomes a single newline token."""
        ids = self.tokenizer.encode(prompt).ids
        return ids if ids else self.tokenizer.encode("\n").ids[:1]

    def _tokens(self, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler,
                times: list[float]) -> Iterator[int]:
        """The loop: prefill once, then sample and decode with the carried state.

        Appends the prefill wall time to `times`. Each token is yielded before the next
        decode step runs, so a consumer that stops early never pays for an unused step.
        """
        session = self.session
        t = time.perf_counter()
        logits, state = session.prefill(prompt_ids)
        times.append(time.perf_counter() - t)
        logits = logits[-1]
        history = list(prompt_ids)  # for the repetition penalty
        decoder = session.decoder(state)
        for i in range(max_new_tokens):
            token = sampler(logits, history)
            history.append(token)
            yield token
            if i + 1 < max_new_tokens:
                logits = decoder.step(token)

    def _sampler(self, sampling: SamplingConfig | None) -> Sampler:
        sampling = sampling if sampling is not None else SamplingConfig()
        if sampling.seed is None and not sampling.greedy:
            # Record the randomness actually used, so any run can be replayed.
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(32))
        return Sampler(sampling)

    def _check(self, n_prompt: int, max_new_tokens: int) -> None:
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        limit = self.bundle.model_config.get("max_seq_len")
        if limit and n_prompt + max_new_tokens > limit:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's max_seq_len {limit}")

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                     sampling: SamplingConfig | None = None) -> list[int]:
        """New token ids after `prompt_ids` (no text, no stop strings, no stats)."""
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; give at least one token")
        self._check(len(prompt_ids), max_new_tokens)
        return list(self._tokens(prompt_ids, max_new_tokens, self._sampler(sampling), []))

    def generate(self, prompt: str, max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
                 stop: Sequence[str] = (), stream: bool = True) -> Generation:
        """Continue `prompt`; returns a `Generation` to iterate for text pieces.

        sampling: None samples from the plain softmax with a fresh (recorded) seed;
        SamplingConfig(temperature=0) is greedy.
        stop: strings that end the generation; the text ends right before the first one.
        stream: False yields the whole text as one piece at the end.
        """
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        start = time.perf_counter()
        ids = self.encode(prompt)
        self._check(len(ids), max_new_tokens)
        sampler = self._sampler(sampling)
        gen = Generation(prompt, ids, sampler.config)
        pieces = self._pieces(gen, start, max_new_tokens, sampler, stop)
        gen._pieces = pieces if stream else _whole(pieces)
        return gen

    def _pieces(self, gen: Generation, start: float, max_new_tokens: int, sampler: Sampler,
                stop: tuple[str, ...]) -> Iterator[str]:
        streamer = TextStreamer(self.tokenizer)
        push = streamer.push
        out = gen.token_ids
        emitted: list[str] = []
        times: list[float] = []
        paused = 0.0  # time spent by the caller between pieces, kept out of the stats
        first = None
        held = ""  # decoded text not yet emitted: it may be the start of a stop string
        reason = "max_new_tokens"

        for token in self._tokens(gen.prompt_ids, max_new_tokens, sampler, times):
            if first is None:
                first = time.perf_counter()
            out.append(token)
            piece = push(token)
            if stop:
                piece, held, hit = _hold_back(held + piece, stop)
                if hit:
                    reason = "stop_string"
            if piece:
                emitted.append(piece)
                t = time.perf_counter()
                yield piece
                paused += time.perf_counter() - t
            if reason == "stop_string":
                break
        end = time.perf_counter()

        if reason != "stop_string":
            tail = held + streamer.flush()
            if stop:
                cut = _first_stop(tail, stop)
                if cut is not None:
                    tail, reason = tail[:cut], "stop_string"
            if tail:
                emitted.append(tail)
                yield tail

        n = len(out)
        prefill_s = times[0]
        decode_s = max(end - first - paused, 0.0)
        gen.stats = self.last_stats = GenerationStats(
            prompt_tokens=len(gen.prompt_ids),
            new_tokens=n,
            time_to_first_token_s=first - start,
            prefill_s=prefill_s,
            prefill_tokens_per_s=len(gen.prompt_ids) / prefill_s if prefill_s > 0 else 0.0,
            decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=end - start - paused,
            peak_rss_mb=peak_rss_mb(),
            stop_reason=reason,
            text="".join(emitted),
        )


def _whole(pieces: Iterator[str]) -> Iterator[str]:
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

