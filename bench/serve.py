"""itera-bench serve: an itera-serve process on loopback, timed as its clients see it.

Two kinds of rows per bundle, all from streaming requests at temperature 0:
- `c{N} pp{p}+tg{n}` (`... batched` where the server batched that bundle's decode steps): N clients at once, each one completion of p prompt tokens (the Hamlet
  context of latency.py) and n new tokens. Three metrics: `time_to_first_token` (ms from
  sending the request to the first text event, median over the clients), `tokens_per_s_per_client`
  (each client's new tokens over its whole request time, median over the clients; the time
  between a tiny model's tokens is below what a client can resolve) and `tokens_per_s_total`
  (every client's new tokens over the wall time of the round). When the bench started the
  server, `extra.server_cpu_ms_per_token` is the server's CPU time (all threads) per new
  token, which other load on the machine changes less than wall time.
- `graph b{N}`: the bundle's decode graph alone run on N rows at once (tokens/s over all rows),
  next to `graph b1`: what batching the server's decode steps could gain at most. Measured for
  fixed-shape (SSM) states only: a KV buffer's rows would each need their own position.
  `extra.cpu_ms_per_token` is this process's CPU time per token, beside the server's.
- `chat{T} session` and `chat{T} resend`: a T-turn chat through /v1/chat/completions, every
  request re-sending the whole history, with a session and without; the metric is the
  time to first token of the last turn, with every turn's in `extra`.

The clients are threads of this process (http.client, no extra dependency), so on a small
machine they share the CPU with the server: the numbers are what a client on the same box
sees. The server runs with the given thread count (`-t`), one process per count.
"""

from __future__ import annotations

import functools
import http.client
import json
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from itera_runtime.bundle import Bundle
from itera_runtime.errors import UserError

from .latency import CONTEXT_TEXT
from .record import Record
from .sweep import Case, Sample, bundle_fields, run_cases

CHAT_LINES = [line for line in CONTEXT_TEXT.splitlines() if line.strip()]


class ServeBenchError(UserError, ValueError):
    """The server could not be started or reached, or refused a request."""


@dataclass
class Stream:
    """What one streaming request looked like from the client."""

    sent: float
    first: float | None = None
    end: float = 0.0
    text: str = ""
    usage: dict = field(default_factory=dict)

    @property
    def ttft_s(self) -> float:
        return (self.first if self.first is not None else self.end) - self.sent

    @property
    def new_tokens(self) -> int:
        return int(self.usage.get("completion_tokens", 0))

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole request, as the client waited for them (prefill and queue included)."""
        return self.new_tokens / (self.end - self.sent) if self.end > self.sent else 0.0


def stream_request(url: str, path: str, body: dict, headers: dict | None = None, timeout_s: float = 600) -> Stream:
    """Send one streaming request and read its server-sent events to [DONE]."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    out = Stream(sent=time.perf_counter())
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        if resp.status != 200:
            data = resp.read()
            try:
                message = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = data[:200].decode("utf-8", "replace")
            raise ServeBenchError(f"{url}{path}: HTTP {resp.status}: {message}")
        pieces = []
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ServeBenchError(f"{url}{path}: {event['error'].get('message')}")
            choice = event["choices"][0]
            piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if piece:
                if out.first is None:
                    out.first = time.perf_counter()
                pieces.append(piece)
            if event.get("usage"):
                out.usage = event["usage"]
        out.end = time.perf_counter()
        out.text = "".join(pieces)
    except (OSError, http.client.HTTPException) as e:
        raise ServeBenchError(f"{url}{path}: {e}") from None
    finally:
        conn.close()
    return out


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) a process has used; None without a pid."""
    if pid is None:
        return None
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def concurrent_round(url: str, model: str, prompt: str, n_gen: int, clients: int, server_pid: int | None = None
                     ) -> Sample:
    """`clients` streaming completions at once; the median TTFT, and per-client and total rates in extra.

    server_pid: also give the server's CPU time per generated token (all its threads), which
    other load on the machine changes less than wall time.
    """
    results: list[Stream | BaseException] = [ValueError("not run")] * clients
    cpu_before = _cpu_s(server_pid)
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            start.wait()
            results[i] = stream_request(url, "/v1/completions", {"model": model, "prompt": prompt,
                                                                 "max_tokens": n_gen, "temperature": 0})
        except BaseException as e:  # re-raised below in the bench's thread
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    cpu_after = _cpu_s(server_pid)
    streams = [r for r in results if isinstance(r, Stream)]
    wall = max(s.end for s in streams) - min(s.sent for s in streams)
    ttft = statistics.median(s.ttft_s for s in streams)
    new_tokens = sum(s.new_tokens for s in streams)
    extra = {"tokens_per_s_per_client": statistics.median(s.tokens_per_s for s in streams),
             "tokens_per_s_total": new_tokens / wall, "ttft_ms_max": max(s.ttft_s for s in streams) * 1e3,
             "new_tokens": new_tokens}
    if cpu_before is not None and cpu_after is not None and new_tokens:
        # prefill included: the server's whole cost of a request, spread over its new tokens
        extra["server_cpu_ms_per_token"] = (cpu_after - cpu_before) * 1e3 / new_tokens
    return Sample(ttft * 1e3, int(wall * 1e9), extra)


def chat_round(url: str, model: str, turns: int, n_gen: int, session: bool) -> Sample:
    """A `turns`-turn chat, the whole history re-sent each turn; TTFT of the last turn, every turn's in extra."""
    history: list[dict] = []
    extra_body = {"session": f"bench-{uuid.uuid4().hex}"} if session else {}
    ttfts, cached, prompt_tokens = [], 0, 0
    for i in range(turns):
        history.append({"role": "user", "content": CHAT_LINES[i % len(CHAT_LINES)]})
        s = stream_request(url, "/v1/chat/completions", {"model": model, "messages": history, "max_tokens": n_gen,
                                                         "temperature": 0, **extra_body})
        history.append({"role": "assistant", "content": s.text})
        ttfts.append(s.ttft_s * 1e3)
        cached = s.usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        prompt_tokens = s.usage.get("prompt_tokens", 0)
    return Sample(ttfts[-1], int(sum(ttfts) * 1e6), {"ttft_ms_per_turn": ttfts, "last_prompt_tokens": prompt_tokens,
                                                     "last_cached_tokens": cached})


def _get(url: str, path: str) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise ServeBenchError(f"{url}{path}: HTTP {resp.status}")
        return json.loads(data)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ServeBenchError(f"{url}{path}: {e}") from None
    finally:
        conn.close()


def _prompt(bundle: Bundle, n_prompt: int) -> str:
    """Text of exactly n_prompt tokens of the (repeated) context: the latency rows' prompt."""
    import numpy as np

    tok = bundle.load_tokenizer()
    ids = np.resize(np.asarray(tok.encode(CONTEXT_TEXT).ids), n_prompt).tolist()
    return tok.decode(ids)


def serve_cases(url: str, bundles: list[Bundle], threads: int | None, clients: list[int], n_prompt: int, n_gen: int,
                chat_turns: int, chat_gen: int, server_pid: int | None = None) -> list[Case]:
    models = {m["id"]: m for m in _get(url, "/v1/models")["data"]}
    load = _get(url, "/health").get("models", {})
    cases = []
    for b in bundles:
        model = b.path.name
        if model not in models:
            raise ServeBenchError(f"{url} does not serve {model!r} (it serves: {', '.join(models)})")
        if models[model].get("bundle_sha256") not in (None, b.sha256):
            raise ServeBenchError(f"{url} serves another bundle as {model!r} (its sha256 differs from {b.path}'s)")
        fields = bundle_fields(b, models[model].get("graph_set"))
        how: dict[str, Any] = {"extra": {"parallel": load.get(model, {}).get("parallel"), "url": url}, "n_threads": threads,
               "method": "itera-serve on loopback; streaming clients as threads of the bench process"}
        prompt = _prompt(b, n_prompt)
        batched = " batched" if models[model].get("batched") else ""
        for c in clients:
            cases.append(Case(Record(kind="serve", test=f"c{c} pp{n_prompt}+tg{n_gen}{batched}", metric="time_to_first_token",
                                     unit="ms", higher_is_better=False, n_prompt=n_prompt, n_gen=n_gen,
                                     **fields, **how),
                              functools.partial(concurrent_round, url, model, prompt, n_gen, c, server_pid)))
        if b.state_kind == "ssm":
            cases += [graph_batch_case(b, threads, n, n_gen) for n in sorted({1, *clients})]
        for session in (True, False) if chat_turns else ():
            name = f"chat{chat_turns} {'session' if session else 'resend'}{batched}"
            cases.append(Case(Record(kind="serve", test=name, metric="time_to_first_token", unit="ms",
                                     higher_is_better=False, n_gen=chat_gen, **fields, **how),
                              functools.partial(chat_round, url, model, chat_turns, chat_gen, session)))
    return cases


def graph_batch_case(bundle: Bundle, threads: int | None, batch: int, n_steps: int) -> Case:
    """The decode graph on `batch` rows at once, state carried through numpy (the same copies at every batch)."""
    import numpy as np

    from itera_runtime.bundle import initial_state
    from itera_runtime.session import ModelSession

    session = ModelSession(bundle, threads=threads)
    graph, io = session.graphs["decode"], bundle.io
    outputs = [io.logits, *(s.output for s in bundle.state)]
    feeds = {io.input_ids: np.ones((batch, 1), dtype=np.int64), **initial_state(bundle, batch),
             **session.position_feeds("decode", last_only=True)}

    def run() -> Sample:
        state = dict(feeds)
        t, cpu = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(n_steps):
            outs = graph.run(outputs, state)
            state.update(zip((s.input for s in bundle.state), outs[1:]))
        ns, cpu = time.perf_counter_ns() - t, time.process_time_ns() - cpu
        return Sample(batch * n_steps / (ns / 1e9), ns, {"cpu_ms_per_token": cpu / 1e6 / (batch * n_steps)})

    return Case(Record(kind="serve", test=f"graph b{batch}", metric="tokens_per_s_total", unit="tok/s", n_gen=n_steps,
                       n_threads=threads, ort_settings=dict(session.settings),
                       method="decode graph alone, all rows one step at a time (state through numpy)",
                       **bundle_fields(bundle, session.graph_set)), run)


def rates(records: list[Record], cases: list[Case]) -> list[Record]:
    """The per-client and total tokens/s rows of each concurrent case, from its repetitions."""
    import dataclasses

    measured = {id(r) for r in records}
    out = []
    for case in cases:
        if id(case.record) not in measured or "tokens_per_s_total" not in (case.extras[0] if case.extras else {}):
            continue
        for metric in ("tokens_per_s_per_client", "tokens_per_s_total"):
            out.append(dataclasses.replace(case.record, metric=metric, unit="tok/s", higher_is_better=True,
                                           samples=[e[metric] for e in case.extras], extra=dict(case.record.extra)))
    return out


def serve_records(bundles: list[Bundle], threads: list[int], repetitions: int, warmup: bool, clients: list[int],
                  n_prompt: int, n_gen: int, chat_turns: int, chat_gen: int, parallel: int | None,
                  url: str | None, batch: bool = True) -> list[Record]:
    """Measure an itera-serve of the bundles: the one at `url`, or one started here per thread count."""
    from itera_runtime.serve_process import ServerProcess

    records = []
    for t in ([None] if url else threads):
        if url is not None:
            cases = serve_cases(url, bundles, None, clients, n_prompt, n_gen, chat_turns, chat_gen)
            measured = run_cases(cases, repetitions, warmup, desc="serve")
            records += measured + rates(measured, cases)
            continue
        args = ["--threads", str(t), "--queue", str(max(clients) + 1), "--batch" if batch else "--no-batch"]
        args += ["--parallel", str(parallel)] if parallel else []
        try:
            server = ServerProcess([str(b.path) for b in bundles], args)
        except UserError as e:
            raise ServeBenchError(str(e)) from None
        with server:
            cases = serve_cases(server.url, bundles, t, clients, n_prompt, n_gen, chat_turns, chat_gen, server.pid)
            measured = run_cases(cases, repetitions, warmup, desc="serve")
            peak = server.peak_rss_bytes()
        for r in measured:
            r.extra["server_peak_rss_bytes"] = peak
            r.extra["server"] = " ".join(server.command[2:])
        records += measured + rates(measured, cases)
    return records
