"""llama.cpp as a comparison engine: the Transformer baseline at its best, timed like our bundles.

`itera-bench latency BUNDLE... MODEL.gguf` measures a GGUF (written by `itera-export
--format gguf`) through llama-cpp-python (extra `llamacpp`) with the same tests, depths,
threads, sweep and record as a bundle, so a row of llama.cpp sits beside a row of ONNX:

- `pp{n}@d{d}`: `Llama.eval` of n prompt tokens after d tokens of context; tokens/s over that
  call; time to first token adds the greedy pick of the first token.
- `tg{n}@d{d}`: n decode steps after d tokens of context, each `Llama.eval([token])` plus a
  greedy pick (argmax of the last logits) — the same work as our generate loop's step plus
  greedy sampling. llama-cpp-python's Python wrapper (a few µs per call) is inside it, as
  our Python loop is inside ours; llama-bench, which has neither, is a little faster still.

The context is the same real text as the bundles' (bench/latency.py). The depth's KV cache is
built once per case; each repetition rewinds to it (`n_tokens`), which is how llama-cpp-python
reuses a prefix. Flash attention: llama.cpp turns it on by default on CPU, and it halves decode
speed for 32-wide heads (measured, ../shared/notes); `--flash-attn auto` times both at the
first depth during set-up and keeps the faster, recorded in each row's extra.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .record import Record
from .sweep import Case, Sample
from itera_runtime.errors import UserError

GGUF_QUANT = {"ALL_F32": "none", "MOSTLY_F16": "fp16", "MOSTLY_Q8_0": "int8", "MOSTLY_Q4_0": "int4"}


class LlamaCppError(UserError, ValueError):
    """llama-cpp-python missing, or a GGUF it cannot load; one line."""


def is_gguf(path: str) -> bool:
    return str(path).endswith(".gguf")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppError("measuring a .gguf needs llama-cpp-python: pip install 'itera-lite[llamacpp]'") from None
    return llama_cpp


class GgufModel:
    """A .gguf file and what its header says (read with the gguf package; no llama.cpp yet)."""

    def __init__(self, path: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaCppError(f"{path}: no such GGUF file")
        try:
            import gguf

            reader = gguf.GGUFReader(str(self.path))
        except ImportError:
            raise LlamaCppError("reading a .gguf needs the gguf package: pip install 'itera-lite[llamacpp]'") from None
        except Exception as e:  # the reader raises plain errors on a bad file
            raise LlamaCppError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:120]})") from None

        def field(name, default=None):
            f = reader.fields.get(name)
            return f.contents() if f is not None else default

        self.arch = field("general.architecture", "?")
        self.context_length = int(field(f"{self.arch}.context_length", 0) or 0)
        file_type = field("general.file_type")
        self.quantization = GGUF_QUANT.get(gguf.LlamaFileType(file_type).name, "other") if file_type is not None else "?"
        self.n_params = int(sum(int(np.prod([int(d) for d in t.shape])) for t in reader.tensors))
        self.size_bytes = self.path.stat().st_size
        self.vocab = field("tokenizer.ggml.tokens")

    @property
    def family(self) -> str:
        return "baseline" if self.arch == "llama" else self.arch


class GgufTarget:
    """A GGUF loaded in llama.cpp at one thread count."""

    def __init__(self, model: GgufModel, threads: int | None, flash_attn: str = "auto", n_ctx: int | None = None):
        from .latency import CONTEXT_TEXT

        self.model = model
        self.threads = threads or 1
        self.n_ctx = n_ctx or model.context_length or 4096
        self._llama_cpp = _llama_cpp()
        self.flash_attn_mode = flash_attn
        self.flash_attn: bool = flash_attn == "on"  # "auto": the faster of the two, after _pick_flash_attn
        self.llm = self._load(flash_attn == "on")
        self.n_vocab = self.llm.n_vocab()
        self._text_ids = np.asarray(self.llm.tokenize(CONTEXT_TEXT.encode(), add_bos=False, special=False),
                                    dtype=np.int64)
        if flash_attn == "auto":
            self.llm = self._pick_flash_attn()

    def _load(self, flash_attn: bool):
        try:
            return self._llama_cpp.Llama(model_path=str(self.model.path), n_ctx=self.n_ctx, n_batch=512,
                                         n_threads=self.threads, n_threads_batch=self.threads,
                                         flash_attn=flash_attn, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise LlamaCppError(f"{self.model.path}: llama.cpp could not load it ({e})") from None

    def _pick_flash_attn(self):
        """Time 32 decode steps at depth 128 with flash attention off and on; keep the faster."""
        best = None
        for fa in (False, True):
            llm = self.llm if not fa else self._load(True)
            llm.reset()
            llm.eval(self.context(128).tolist())
            t = time.perf_counter()
            for token in self.context(160)[128:].tolist():
                llm.eval([token])
            secs = time.perf_counter() - t
            if best is None or secs < best[0]:
                best = (secs, fa, llm)
        _, self.flash_attn, llm = best
        return llm

    def context(self, n: int) -> np.ndarray:
        return np.resize(self._text_ids, n)

    def at_depth(self, n: int) -> None:
        """The KV cache holds exactly the first n context tokens (built once, then rewound)."""
        llm = self.llm
        have = llm.n_tokens
        if have >= n and list(llm.input_ids[:n]) == self.context(n).tolist():
            llm.n_tokens = n  # the next eval drops the cache past n
            return
        llm.reset()
        if n:
            llm.eval(self.context(n).tolist())

    def template(self, test: str, **how) -> Record:
        m = self.model
        return Record(kind="latency", test=test, metric="tokens_per_s", unit="tok/s", n_threads=self.threads,
                      bundle=str(m.path), model_filename=os.path.basename(m.path), family=m.family,
                      quantization=m.quantization, engine="llama.cpp", model_size=m.size_bytes,
                      model_n_params=m.n_params, model_n_params_active=m.n_params,
                      extra={"flash_attn": self.flash_attn, "llama_cpp_python": self._llama_cpp.__version__}, **how)

    def _greedy(self) -> int:
        """Argmax of the last evaluated token's logits, read in place from llama.cpp (no copy):
        llama-cpp-python fills `Llama.scores` only with logits_all, which would copy every row."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))


def _check(target: GgufTarget, n_depth: int, n_tokens: int) -> None:
    if n_depth + n_tokens > target.n_ctx:
        raise LlamaCppError(f"{target.model.path}: depth {n_depth} + {n_tokens} tokens exceeds its context "
                         f"length {target.n_ctx}")


def prompt_case(target: GgufTarget, n_prompt: int, n_depth: int) -> Case:
    from .latency import _name

    _check(target, n_depth, n_prompt)

    def run() -> Sample:
        target.at_depth(n_depth)
        ids = target.context(n_depth + n_prompt)[n_depth:].tolist()
        t0 = time.perf_counter_ns()
        target.llm.eval(ids)
        t1 = time.perf_counter_ns()
        target._greedy()
        t2 = time.perf_counter_ns()
        return Sample(n_prompt / ((t1 - t0) / 1e9), t1 - t0, {"ttft_ms": (t2 - t0) / 1e6})

    return Case(target.template(_name("pp", n_prompt, n_depth), n_prompt=n_prompt, n_depth=n_depth), run)


def gen_case(target: GgufTarget, n_gen: int, n_depth: int) -> Case:
    from .latency import _name

    _check(target, n_depth, n_gen + 1)
    start = max(n_depth, 1)

    def run() -> Sample:
        target.at_depth(start)
        token = int(target.context(start + 1)[start])  # the next context token: what is fed does not change the cost
        eval_, greedy = target.llm.eval, target._greedy
        t = time.perf_counter_ns()
        for _ in range(n_gen):
            eval_([token])
            token = greedy()
        ns = time.perf_counter_ns() - t
        return Sample(n_gen / (ns / 1e9), ns)

    return Case(target.template(_name("tg", n_gen, n_depth), n_gen=n_gen, n_depth=n_depth), run)

