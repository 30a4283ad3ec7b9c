"""llama.cpp as a comparison engine: both families as GGUF files, timed like our bundles.

`itera-bench latency/step/quality ... MODEL.gguf` measures a GGUF (written by `itera-export
--format gguf`: the baseline as llama.cpp's `llama`, Itera-Lite as its `granitehybrid`) through
llama-cpp-python (extra `llamacpp`) with the same tests, depths, threads, sweep and record as a
bundle, so a row of llama.cpp sits beside a row of ONNX, and an Itera GGUF beside a Transformer
GGUF in the same engine:

- `pp{n}@d{d}`: `Llama.eval` of n prompt tokens after d tokens of context (one batched decode per
  n_batch tokens); tokens/s over that call; time to first token adds the greedy pick.
- `tg{n}@d{d}`: n decode steps after d tokens of context. Timed loop `decode` (default): llama.cpp's
  own `llama_decode` on one reused one-token batch, as llama-bench's tg test does, plus the
  greedy pick (argmax of the last logits read in place) that our generate loop also pays. Loop
  `eval`: llama-cpp-python's high-level `Llama.eval([token])` per token (its Python bookkeeping
  inside; 13-26% slower on the tiny models). Loop `llama-bench`: llama.cpp's own `llama-bench`
  binary (its C++ loop, its warm-up, its depth handling), one run of it per repetition; `auto`
  (the default) takes it where it is installed ($ITERA_LLAMA_BENCH, else `llama-bench` on PATH)
  and `decode` elsewhere. Each row says which loop was timed (`extra.loop`), and a llama-bench
  row its build (`extra.llama_bench`).
- `step@d{d}` (`itera-bench step`): the decode loop without the greedy pick, µs per token.
- quality: bits/byte with llama.cpp's logits and llama.cpp's tokenizer (token bytes from
  `llama_token_to_piece`), the same window rule as the bundles (bench/quality.py).

Depth. A KV cache is built once per case and each repetition rewinds it (`n_tokens` plus
removing the cells past it). A recurrent model's state cannot be rewound (llama.cpp's recurrent
memory keeps only the latest state), so the state after the depth's prefill is saved once
(`llama_state_get_data`) and restored before each repetition.

Flash attention: llama.cpp turns it on by default on CPU, and it halves decode speed for
32-wide heads (measured, ../shared/notes); `--flash-attn auto` times both at the first depth
during set-up and keeps the faster, recorded in each row's extra.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from .record import Record
from .sweep import Case, Sample
from itera_runtime.errors import UserError

LOOPS = {"decode": "llama_decode on a reused 1-token batch (llama-bench's loop) + greedy argmax in place",
         "eval": "llama-cpp-python Llama.eval([token]) per token + greedy argmax in place",
         "llama-bench": "the llama-bench binary (llama.cpp's own C++ loop and warm-up), one run per repetition"}
LLAMA_BENCH_ENV = "ITERA_LLAMA_BENCH"
GGUF_QUANT = {"ALL_F32": "none", "MOSTLY_F16": "fp16", "MOSTLY_Q8_0": "int8", "MOSTLY_Q4_0": "int4"}


class LlamaCppError(UserError, ValueError):
    """llama-cpp-python missing, or a GGUF it cannot load; one line."""


def is_gguf(path: str) -> bool:
    return str(path).endswith(".gguf")


def find_llama_bench() -> str | None:
    """The llama-bench binary: $ITERA_LLAMA_BENCH if set, else `llama-bench` on PATH, else None."""
    path = os.environ.get(LLAMA_BENCH_ENV)
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise LlamaCppError(f"${LLAMA_BENCH_ENV}={path}: not an executable file")
        return path
    return shutil.which("llama-bench")


def resolve_loop(loop: str) -> str:
    """`auto` → `llama-bench` where the binary is installed, else `decode`; an asked-for binary must exist."""
    if loop == "auto":
        return "llama-bench" if find_llama_bench() else "decode"
    if loop == "llama-bench" and not find_llama_bench():
        raise LlamaCppError(f"--llamacpp-loop llama-bench: no llama-bench binary (set ${LLAMA_BENCH_ENV} or put it "
                            "on PATH; llama.cpp's build makes it: cmake --build build --target llama-bench)")
    if loop not in LOOPS:
        raise LlamaCppError(f"unknown llama.cpp decode loop {loop!r}; choose from auto, {', '.join(LOOPS)}")
    return loop


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
        self._family = field("itera.family")  # written by itera-export; absent in others' files

    @property
    def family(self) -> str:
        return self._family or ("baseline" if self.arch == "llama" else self.arch)


class GgufTarget:
    """A GGUF loaded in llama.cpp at one thread count."""

    def __init__(self, model: GgufModel, threads: int | None, flash_attn: str = "auto", n_ctx: int | None = None,
                 loop: str = "decode", logits_all: bool = False):
        from .latency import CONTEXT_TEXT

        if loop not in LOOPS:
            raise LlamaCppError(f"unknown llama.cpp decode loop {loop!r}; choose from {', '.join(LOOPS)}")
        self.model, self.loop, self.logits_all = model, loop, logits_all
        self.threads = threads or 1
        self.n_ctx = n_ctx or model.context_length or 4096
        self._llama_cpp = _llama_cpp()
        self.flash_attn_mode = flash_attn
        self.flash_attn: bool = flash_attn == "on"  # "auto": the faster of the two, after _pick_flash_attn
        self.llm = self._load(flash_attn == "on")
        self.n_vocab = self.llm.n_vocab()
        lc = self._llama_cpp
        self.recurrent = bool(lc.llama_model_is_recurrent(self.llm.model) or lc.llama_model_is_hybrid(self.llm.model))
        self._saved: dict[int, tuple[ctypes.Array, int]] = {}  # depth → llama.cpp state after its prefill
        self._token = (lc.llama_token * 1)()  # the reused one-token batch of the decode loop
        self._batch = lc.llama_batch_get_one(self._token, 1)
        self._logits_at: int | None = None  # the logits buffer's address, and a numpy view of it
        self._logits = np.empty(0, dtype=np.float32)
        self._text_ids = np.asarray(self.llm.tokenize(CONTEXT_TEXT.encode(), add_bos=False, special=False),
                                    dtype=np.int64)
        if flash_attn == "auto":
            self.llm = self._pick_flash_attn()

    def _load(self, flash_attn: bool):
        try:
            return self._llama_cpp.Llama(model_path=str(self.model.path), n_ctx=self.n_ctx, n_batch=512,
                                         n_threads=self.threads, n_threads_batch=self.threads,
                                         flash_attn=flash_attn, logits_all=self.logits_all, verbose=False)
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

    def clear(self) -> None:
        """Empty memory (KV cache and recurrent state alike), nothing evaluated."""
        self.llm.reset()
        self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self.llm.ctx), True)

    def at_depth(self, n: int) -> None:
        """The memory holds exactly the first n context tokens: a KV cache rewound to them, a
        recurrent state restored from the copy saved after their prefill."""
        llm, lc = self.llm, self._llama_cpp
        if self.recurrent:
            if n not in self._saved:
                self.clear()
                if n:
                    llm.eval(self.context(n).tolist())
                size = lc.llama_state_get_size(llm.ctx)
                buf = (ctypes.c_uint8 * size)()
                self._saved[n] = (buf, lc.llama_state_get_data(llm.ctx, buf, size))
            buf, size = self._saved[n]
            if lc.llama_state_set_data(llm.ctx, buf, size) != size:
                raise LlamaCppError(f"{self.model.path}: llama.cpp could not restore its state at depth {n}")
            llm.n_tokens = n
            llm.input_ids[:n] = self.context(n)
            return
        have = llm.n_tokens
        if have >= n and list(llm.input_ids[:n]) == self.context(n).tolist():
            llm.n_tokens = n
            # drop the cells past n now: the decode loop calls llama_decode directly, past Llama.eval
            lc.llama_memory_seq_rm(lc.llama_get_memory(llm.ctx), 0, n, -1)
            return
        self.clear()
        if n:
            llm.eval(self.context(n).tolist())

    def decode_one(self, token: int) -> None:
        """One token through llama.cpp's own decode on the reused batch (llama-bench's loop)."""
        self._token[0] = token
        if self._llama_cpp.llama_decode(self.llm.ctx, self._batch) != 0:
            raise LlamaCppError(f"{self.model.path}: llama_decode failed (context full?)")

    def template(self, test: str, **how) -> Record:
        return _record(self.model, self.threads, test,
                       {"flash_attn": self.flash_attn, "llama_cpp_python": self._llama_cpp.__version__,
                        "loop": LOOPS[self.loop], "depth": "state restored" if self.recurrent else "KV rewound"},
                       **how)

    def _greedy(self) -> int:
        """Argmax of the last evaluated token's logits, read in place from llama.cpp (no copy):
        llama-cpp-python fills `Llama.scores` only with logits_all, which would copy every row.
        The numpy view is made once per logits buffer (making it costs ~10 µs, a few % of a
        tiny model's step); llama.cpp moves the buffer only when it grows."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        address = ctypes.cast(ptr, ctypes.c_void_p).value
        if address != self._logits_at:
            self._logits_at, self._logits = address, np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return int(self._logits.argmax())


def _record(model: GgufModel, threads: int, test: str, extra: dict, **how) -> Record:
    """A latency row of a GGUF in llama.cpp, whichever loop timed it."""
    return Record(kind="latency", test=test, metric="tokens_per_s", unit="tok/s", n_threads=threads,
                  bundle=str(model.path), model_filename=os.path.basename(model.path), family=model.family,
                  quantization=model.quantization, engine="llama.cpp", model_size=model.size_bytes,
                  model_n_params=model.n_params, model_n_params_active=model.n_params,
                  extra={**extra, "arch": model.arch}, **how)


class LlamaBenchTarget:
    """A GGUF timed by llama.cpp's own llama-bench binary at one thread count.

    Each repetition is one `llama-bench -r 1` run of one test: llama.cpp's C++ loop, its
    warm-up run and its own depth handling (a KV prefill, or a recurrent state saved and
    restored), so the row is llama.cpp at the speed its users see in llama-bench.
    """

    def __init__(self, model: GgufModel, threads: int | None, flash_attn: str = "auto", timeout_s: float = 900):
        self.model, self.threads, self.timeout_s = model, threads or 1, timeout_s
        self.binary = find_llama_bench()
        if self.binary is None:
            raise LlamaCppError(f"no llama-bench binary (set ${LLAMA_BENCH_ENV} or put it on PATH)")
        self.flash_attn_mode = flash_attn
        self.flash_attn: bool = flash_attn == "on"
        self.build = ""
        if flash_attn == "auto":  # as GgufTarget: both timed at depth 128 once, the faster kept
            rows = self.run(0, 32, 128, fa="0,1")
            self.flash_attn = bool(max(rows, key=lambda r: r["avg_ts"])["flash_attn"])

    def run(self, n_prompt: int, n_gen: int, n_depth: int, fa: str | None = None) -> list[dict]:
        """One llama-bench run of one test (-r 1), its JSON rows."""
        fa = fa if fa is not None else str(int(self.flash_attn))
        cmd = [self.binary, "-m", str(self.model.path), "-p", str(n_prompt), "-n", str(n_gen), "-d", str(n_depth),
               "-t", str(self.threads), "-r", "1", "-fa", fa, "-o", "json"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise LlamaCppError(f"{self.model.path}: llama-bench ran past {self.timeout_s:.0f} s") from None
        except OSError as e:
            raise LlamaCppError(f"{self.binary}: could not run llama-bench ({e.strerror})") from None
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        if r.returncode != 0:
            raise LlamaCppError(f"{self.model.path}: llama-bench failed ({lines[-1] if lines else f'exit {r.returncode}'})")
        try:
            rows = json.loads(r.stdout)
            self.build = f"{rows[0]['build_commit']} ({rows[0]['build_number']})"
            return rows
        except (ValueError, LookupError, TypeError):
            raise LlamaCppError(f"{self.binary}: llama-bench printed no JSON rows (is it llama.cpp's llama-bench?)") from None

    def case(self, test: str, n_prompt: int, n_gen: int, n_depth: int) -> Case:
        def run() -> Sample:
            (row,) = self.run(n_prompt, n_gen, n_depth)
            return Sample(float(row["samples_ts"][0]), int(row["samples_ns"][0]), {"llama_bench": self.build})

        how = {"n_prompt": n_prompt} if n_prompt else {"n_gen": n_gen}
        rec = _record(self.model, self.threads, test, {"flash_attn": self.flash_attn, "loop": LOOPS["llama-bench"],
                                                       "depth": "llama-bench's own"}, n_depth=n_depth, **how)
        return Case(rec, run)


def make_target(model: GgufModel, threads: int | None, flash_attn: str = "auto",
                loop: str = "auto") -> GgufTarget | LlamaBenchTarget:
    """The GGUF at one thread count, timed by the loop asked for (`auto`: llama-bench where installed)."""
    loop = resolve_loop(loop)
    if loop == "llama-bench":
        return LlamaBenchTarget(model, threads, flash_attn)
    return GgufTarget(model, threads, flash_attn, loop=loop)


def _check(target: GgufTarget, n_depth: int, n_tokens: int) -> None:
    if n_depth + n_tokens > target.n_ctx:
        raise LlamaCppError(f"{target.model.path}: depth {n_depth} + {n_tokens} tokens exceeds its context "
                         f"length {target.n_ctx}")


def prompt_case(target: GgufTarget | LlamaBenchTarget, n_prompt: int, n_depth: int) -> Case:
    from .latency import _name

    if isinstance(target, LlamaBenchTarget):
        return target.case(_name("pp", n_prompt, n_depth), n_prompt, 0, n_depth)
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


def gen_case(target: GgufTarget | LlamaBenchTarget, n_gen: int, n_depth: int) -> Case:
    from .latency import _name

    if isinstance(target, LlamaBenchTarget):
        return target.case(_name("tg", n_gen, n_depth), 0, n_gen, n_depth)
    _check(target, n_depth, n_gen + 1)
    start = max(n_depth, 1)

    def run() -> Sample:
        target.at_depth(start)
        token = int(target.context(start + 1)[start])  # the next context token: what is fed does not change the cost
        step = target.decode_one if target.loop == "decode" else (lambda t: target.llm.eval([t]))
        greedy = target._greedy
        t = time.perf_counter_ns()
        for _ in range(n_gen):
            step(token)
            token = greedy()
        ns = time.perf_counter_ns() - t
        return Sample(n_gen / (ns / 1e9), ns)

    return Case(target.template(_name("tg", n_gen, n_depth), n_gen=n_gen, n_depth=n_depth), run)


def step_case(target: GgufTarget, n_steps: int, n_depth: int) -> Case:
    """llama.cpp's raw decode step (no sampling: a synchronize instead of the greedy pick), µs per token."""
    _check(target, n_depth, n_steps + 1)
    start = max(n_depth, 1)
    sync = target._llama_cpp.llama_synchronize

    def run() -> Sample:
        target.at_depth(start)
        tokens = target.context(start + n_steps)[start:].tolist()
        ctx = target.llm.ctx
        t, cpu = time.perf_counter_ns(), time.process_time_ns()
        for token in tokens:
            target.decode_one(token)
            sync(ctx)
        ns, cpu = time.perf_counter_ns() - t, time.process_time_ns() - cpu
        return Sample(ns / 1e3 / n_steps, ns, {"cpu_us_per_step": cpu / 1e3 / n_steps})

    rec = target.template(f"step@d{n_depth}", n_gen=n_steps, n_depth=n_depth)
    rec = dataclasses.replace(rec, kind="step", metric="us_per_step", unit="µs", higher_is_better=False)
    rec.extra["loop"] = "llama_decode on a reused 1-token batch + llama_synchronize (llama-bench's loop)"
    return Case(rec, run)


class _Session:
    """The one method of ModelSession the quality window rule calls, on llama.cpp's logits."""

    def __init__(self, target: GgufTarget):
        self.target = target

    def forward_chunks(self, ids, state, chunk):
        t = self.target
        t.clear()
        t.llm.eval([int(i) for i in ids])
        yield np.asarray(t.llm.scores[: len(ids)], dtype=np.float32), None


def _token_bytes(llm, n_vocab: int) -> np.ndarray:
    """Bytes of every token as llama.cpp's detokenizer writes them (bits/byte's denominator)."""
    return np.array([len(llm.detokenize([i])) for i in range(n_vocab)], dtype=np.int64)


def quality_records(models: list[GgufModel], threads: int | None, docs, data: str, split: str, window: int,
                    stride: int, max_tokens: int | None, max_bytes: int | None) -> list[Record]:
    """bits_per_byte, loss and perplexity of each GGUF through llama.cpp (logits and tokenizer)."""
    from itera_lite.data.prepared import _chunks

    from .quality import METRICS, Score, window_blocks
    from .sweep import stamp
    from itera_runtime.scoring import nll_nats

    records = []
    for m in models:
        target = GgufTarget(m, threads, "off", n_ctx=max(window + 8, 64), logits_all=True)
        llm = target.llm
        ids = np.concatenate([np.asarray(llm.tokenize(p.encode(), add_bos=False, special=False), dtype=np.int64)
                              for p in _chunks(docs)])
        ids = ids[:max_tokens] if max_tokens is not None else ids
        if len(ids) < 2:
            raise LlamaCppError("the text has fewer than 2 tokens: nothing to predict")
        byte_len = _token_bytes(llm, target.n_vocab)
        start = time.perf_counter_ns()
        nats, n_tok, n_bytes = 0.0, 0, 0
        for rows, targets in window_blocks(_Session(target), ids, window, stride):  # type: ignore[arg-type]
            nats += nll_nats(rows, targets)
            n_tok += len(targets)
            n_bytes += int(byte_len[targets].sum())
        score, ns = Score(nats, n_tok, n_bytes), time.perf_counter_ns() - start
        extra = {"data": data, "split": split, "max_bytes": max_bytes, "context": f"window {window}, stride {stride}",
                 "window": window, "stride": stride, "n_tokens": n_tok, "n_bytes": n_bytes, "eval_ns": ns,
                 "llama_cpp_python": target._llama_cpp.__version__, "arch": m.arch}
        for metric, unit in METRICS:
            records.append(Record(kind="quality", test=f"{os.path.basename(str(data))}:{split}", metric=metric,
                                  unit=unit, samples=[getattr(score, metric)], higher_is_better=False,
                                  n_threads=target.threads, repetitions=1, warmup=False, samples_ns=[ns],
                                  method=f"llama.cpp logits and tokenizer, window {window}, stride {stride}",
                                  engine="llama.cpp", bundle=str(m.path), model_filename=os.path.basename(m.path),
                                  family=m.family, quantization=m.quantization, model_size=m.size_bytes,
                                  model_n_params=m.n_params, extra=extra))
    stamp(records)
    return records
