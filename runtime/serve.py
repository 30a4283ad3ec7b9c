"""itera-serve: an OpenAI-compatible HTTP server for bundles, with sessions that keep the carried state.

    itera-serve bundles/itera-tiny bundles/baseline-tiny --host 127.0.0.1 --port 8080
    curl localhost:8080/v1/completions -d '{"model": "itera-tiny", "prompt": "To be", "max_tokens": 16}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events ending in `data: [DONE]`), GET /v1/models, GET /v1/models/{id}, GET /health.
Request fields are checked in serve_api.py, sessions kept in serve_sessions.py, generations
run in serve_worker.py (their decode steps batched in serve_batch.py where the state allows);
this module is the HTTP edge and the command line.

The HTTP stack is aiohttp (the `serve` extra), not a hand-written asyncio parser: its C
parser (llhttp) is fuzzed against hostile input and bounds request lines, headers and bodies;
it detects a client that went away and cancels that request's handler (`handler_cancellation`),
which is how a dropped client stops its generation; it streams responses; and it ships wheels
for the Pi's arm64 and armv7. Starlette+uvicorn would need two packages and a body limit of our
own. The base install stays without it: only `itera-serve` imports aiohttp.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import click

from .chat import ChatError, ChatTemplate, chat_template
from .errors import OneLineErrors, UsageError, UserError
from .generate import Generator
from .serve_api import (SESSION_HEADER, ApiError, chunk_body, completion_body, error_body, new_id, parse_body,
                        parse_request, usage)
from .serve_batch import DecodeBatch, can_batch
from .serve_sessions import SessionStore
from .serve_worker import Job, Worker

__all__ = ["ServeConfig", "Server", "main", "serve"]

MIB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server is told at start; the defaults are the command line's."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    threads: int | None = None
    graph_set: str | None = None
    parallel: int = 4  # generations advanced together per bundle
    batch: bool = True  # their decode steps as one graph call, where the state allows (serve_batch.py)
    queue: int = 16  # more requests waiting per bundle before 503
    max_body_bytes: int = MIB
    body_timeout_s: float = 30.0
    request_timeout_s: float = 300.0
    max_prompt_tokens: int = 4096  # new prompt tokens one request may have computed
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    session_dir: str | None = None
    max_sessions: int = 256
    max_session_bytes: int = 256 * MIB


@dataclass
class Model:
    """One served bundle: its id, generator, chat template and worker thread."""

    id: str
    generator: Generator
    template: ChatTemplate
    worker: Worker
    created: int

    def describe(self) -> dict:
        b = self.generator.bundle
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "itera-lite",
                "family": b.family, "quantization": b.quantization, "state_kind": b.state_kind,
                "graph_set": self.generator.session.graph_set, "max_context": b.max_seq_len,
                "chat_template": self.template.name, "bundle_sha256": b.sha256,
                "batched": self.worker.batch is not None}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class Server:
    """The loaded bundles, their workers and sessions, and the aiohttp application over them."""

    def __init__(self, bundles: list[str], config: ServeConfig, log=lambda m: print(m, file=sys.stderr, flush=True)):
        self.config, self.log = config, log
        self.models: dict[str, Model] = {}
        names = [os.path.basename(os.path.normpath(b)) for b in bundles]
        if len(set(names)) != len(names):
            raise UsageError(f"two bundles have the same folder name ({', '.join(names)}): a model id is the "
                             "folder name, so give each bundle its own")
        for path, name in zip(bundles, names):
            gen = Generator(path, threads=config.threads, graph_set=config.graph_set)
            created = int(os.path.getmtime(gen.bundle.manifest_path))
            batch = DecodeBatch(gen.session, config.parallel) if config.batch and can_batch(gen.session) else None
            self.models[name] = Model(name, gen, chat_template(gen.bundle),
                                      Worker(name, config.parallel, config.queue, batch), created)
        self.store = SessionStore(config.max_sessions, config.max_session_bytes, config.session_dir)
        loaded, skipped = self.store.restore({m.generator.bundle.sha256: m.generator for m in self.models.values()})
        for line in skipped:
            log(f"itera-serve: warning: session file skipped: {line}")
        if config.session_dir:
            log(f"itera-serve: {loaded} session(s) restored from {config.session_dir}")
        self._key = _digest(f"Bearer {config.api_key}") if config.api_key else None

    def stop(self) -> None:
        for m in self.models.values():
            m.worker.stop()

    # -- the application ---------------------------------------------------------------------------
    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model}", self._get_model)
        app.router.add_post("/v1/completions", lambda r: self._generate(r, "completion"))
        app.router.add_post("/v1/chat/completions", lambda r: self._generate(r, "chat"))
        return app

    @property
    def _errors(self):
        from aiohttp import web

        @web.middleware
        async def errors(request, handler):
            try:
                return await handler(request)
            except ApiError as e:
                return web.json_response(error_body(e), status=e.status, headers=e.headers)
            except web.HTTPException as e:  # aiohttp's own: no such route (404), method (405), body too large (413)
                if e.status < 400:
                    raise
                code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
                message = {413: f"request body exceeds the server's limit of {self.config.max_body_bytes} bytes",
                           404: f"no such endpoint: {request.method} {request.path}"}.get(e.status, e.reason)
                return web.json_response(error_body(ApiError(e.status, message, code=code)), status=e.status)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: its traceback goes to the log, the client gets a 500 body
                traceback.print_exc(file=sys.stderr)
                return web.json_response(error_body(ApiError(500, f"internal error: {type(e).__name__}",
                                                             type="server_error", code="internal_error")), status=500)

        return errors

    def _authorized(self, request) -> bool:
        if self._key is None:
            return True
        return hmac.compare_digest(_digest(request.headers.get("Authorization", "")), self._key)

    def _auth(self, request) -> None:
        if not self._authorized(request):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _model(self, name: str | None) -> Model:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ApiError(400, f"model is required (this server has {', '.join(self.models)})", param="model")
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist on this server (it has: {', '.join(self.models)})",
                           param="model", code="model_not_found")
        return self.models[name]

    async def _health(self, request):
        from aiohttp import web

        body: dict = {"status": "ok"}
        if self._authorized(request):
            body.update(models={n: m.worker.load() for n, m in self.models.items()}, sessions=self.store.stats())
        return web.json_response(body)

    async def _list_models(self, request):
        from aiohttp import web

        self._auth(request)
        return web.json_response({"object": "list", "data": [m.describe() for m in self.models.values()]})

    async def _get_model(self, request):
        from aiohttp import web

        self._auth(request)
        return web.json_response(self._model(request.match_info["model"]).describe())

    async def _read_body(self, request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"request body exceeds the server's limit of {limit} bytes", code="request_too_large")
        try:
            return await asyncio.wait_for(request.read(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                           code="timeout") from None

    # -- generation ----------------------------------------------------------------------------------
    async def _generate(self, request, kind: str):
        self._auth(request)
        req = parse_request(parse_body(await self._read_body(request)), kind, request.headers.get(SESSION_HEADER))
        model = self._model(req.model)
        try:
            text = model.template.render(req.messages) if kind == "chat" else req.prompt
        except ChatError as e:
            raise ApiError(400, str(e), param="messages") from None
        assert text is not None
        stop = tuple(dict.fromkeys(req.stop + (model.template.stop if kind == "chat" else ())))
        job = await self._job(model, req, text, stop)
        rid = new_id(kind)
        try:
            model.worker.submit(job)
        except ApiError:
            job.release_session()
            raise
        try:
            if req.stream:
                return await self._stream(request, job, kind, rid, model.id)
            return await self._collect(job, kind, rid, model.id)
        finally:
            job.cancel.set()  # a finished job ignores it; a client that went away stops its generation here

    async def _job(self, model: Model, req, text: str, stop: tuple[str, ...]) -> Job:
        """Session, tokens and limits of a request, checked; the session is checked out on success."""
        cfg = self.config
        gen = model.generator
        session = self.store.checkout(req.session, gen.bundle.sha256, model.id) if req.session else None
        try:
            state, cached, new_text = None, 0, text
            if session is not None and session.continues(text):
                state, cached, new_text = session.state, session.state.position, text[session.text_len:]
            param = "messages" if req.kind == "chat" else "prompt"
            try:
                ids = await asyncio.to_thread(gen.encode, new_text)
            except ValueError as e:  # text that is not valid Unicode (lone surrogates)
                raise ApiError(400, str(e), param=param) from None
            if len(ids) > cfg.max_prompt_tokens:
                raise ApiError(400, f"the prompt has {len(ids)} tokens to compute, more than this server's "
                                    f"--max-prompt-tokens {cfg.max_prompt_tokens}", param=param,
                               code="context_length_exceeded")
            limit = gen.bundle.max_seq_len
            room = limit - cached - len(ids) if limit else cfg.max_tokens_limit
            if room < 1:
                raise ApiError(400, f"the prompt ({cached + len(ids)} tokens) leaves no room in this model's context "
                                    f"of {limit} tokens", param=param, code="context_length_exceeded")
            max_tokens = req.max_tokens
            if max_tokens is None:
                max_tokens = min(cfg.default_max_tokens, room, cfg.max_tokens_limit)
            elif max_tokens > cfg.max_tokens_limit:
                raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {cfg.max_tokens_limit}",
                               param="max_tokens")
            elif max_tokens > room:
                raise ApiError(400, f"prompt ({cached + len(ids)} tokens) + max_tokens ({max_tokens}) exceeds this "
                                    f"model's context of {limit} tokens", param="max_tokens",
                               code="context_length_exceeded")
            loop = asyncio.get_running_loop()
            return Job(gen, text, new_text, ids, max_tokens, req.sampling, stop,
                       time.monotonic() + cfg.request_timeout_s, loop, asyncio.Queue(), state=state,
                       session_id=req.session, cached_tokens=cached, store=self.store if req.session else None)
        except BaseException:
            if req.session:
                self.store.release(req.session)
            raise

    async def _next(self, job: Job):
        kind, value = await job.events.get()
        if kind == "error":
            raise value
        return kind, value

    async def _collect(self, job: Job, kind: str, rid: str, model: str):
        from aiohttp import web

        pieces = []
        while True:
            event, value = await self._next(job)
            if event == "piece":
                pieces.append(value)
                continue
            stats = value["stats"]
            body = completion_body(kind, rid, model, "".join(pieces), _finish_reason(stats),
                                   usage(value["prompt_tokens"], stats.new_tokens, value["cached_tokens"]),
                                   value["session"])
            return web.json_response(body)

    async def _stream(self, request, job: Job, kind: str, rid: str, model: str):
        from aiohttp import web

        event, value = await self._next(job)  # an error before the first token is a plain error response
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)

        async def send(data) -> None:
            await response.write(b"data: " + (data if isinstance(data, bytes) else
                                               json.dumps(data, ensure_ascii=False).encode()) + b"\n\n")

        first = True
        try:
            while True:
                if event == "piece":
                    await send(chunk_body(kind, rid, model, value, first=first))
                    first = False
                else:
                    stats = value["stats"]
                    if first and kind == "chat":  # no text at all: the role still comes first
                        await send(chunk_body(kind, rid, model, "", first=True))
                    await send(chunk_body(kind, rid, model, None, _finish_reason(stats),
                                          usage(value["prompt_tokens"], stats.new_tokens, value["cached_tokens"]),
                                          value["session"]))
                    await send(b"[DONE]")
                    break
                event, value = await self._next(job)
        except ApiError as e:  # after the first token the status is sent: the error goes as an event
            await send(error_body(e))
        except (ConnectionResetError, ConnectionError):
            return response  # the client went away; `finally` in _generate cancels the job
        await response.write_eof()
        return response

    # -- running ---------------------------------------------------------------------------------------
    async def run(self, ready=None) -> None:
        """Serve until SIGINT/SIGTERM (or until `ready`'s caller cancels); `ready(url)` once listening."""
        from aiohttp import web

        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, backlog=128)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise UserError(f"cannot listen on {self.config.host}:{self.config.port} ({e.strerror or e})") from None
        host, port = runner.addresses[0][:2]  # the port the OS gave for --port 0
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stopping.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        if ready is not None:
            ready(url)
        try:
            await stopping.wait()
        finally:
            await runner.cleanup()
            await asyncio.to_thread(self.stop)


def _finish_reason(stats) -> str:
    return "stop" if stats.stop_reason in ("stop_string", "eos_token") else "length"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(bundles: list[str], config: ServeConfig) -> None:
    """Load the bundles and serve them until SIGINT or SIGTERM."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UserError("itera-serve needs the serve extra: pip install 'itera-lite[serve]'") from None
    if config.session_dir is not None:
        try:
            Path(config.session_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--session-dir {config.session_dir}: cannot create it ({e.strerror or e})") from None
    server = Server(bundles, config)
    if not _loopback(config.host) and not config.api_key:
        server.log(f"itera-serve: warning: listening on {config.host} without --api-key: anyone who can reach "
                   "this address can use the models")

    def ready(url: str) -> None:
        server.log(f"itera-serve: listening on {url} (models: {', '.join(server.models)}); Ctrl-C stops")

    try:
        asyncio.run(server.run(ready))
    finally:
        server.stop()


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything but loopback exposes the models (use --api-key)")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port (printed)")
@click.option("--api-key", default=None, envvar="ITERA_SERVE_API_KEY",
              help="require 'Authorization: Bearer KEY' on /v1 (or set ITERA_SERVE_API_KEY)")
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads per bundle")
@click.option("--graph-set", default=None, help="graph set of a dual bundle (fused, portable); default: the best here")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1),
              help="generations per bundle advanced together, token by token")
@click.option("--batch/--no-batch", default=True, show_default=True,
              help="decode the --parallel generations of a bundle in one graph call (Itera-Lite bundles; a KV "
                   "buffer is decoded one request at a time)")
@click.option("--queue", default=16, show_default=True, type=click.IntRange(0),
              help="requests per bundle that may wait beyond --parallel; more get 503")
@click.option("--max-body", "max_body_bytes", default=MIB, show_default=True, type=click.IntRange(1024),
              help="largest request body, bytes (413 beyond)")
@click.option("--request-timeout", "request_timeout_s", default=300.0, show_default=True,
              type=click.FloatRange(0, min_open=True), help="seconds a request may take, queue included (504 beyond)")
@click.option("--body-timeout", "body_timeout_s", default=30.0, show_default=True,
              type=click.FloatRange(0, min_open=True), help="seconds a request body may take to arrive (408 beyond)")
@click.option("--max-prompt-tokens", default=4096, show_default=True, type=click.IntRange(1),
              help="prompt tokens one request may have computed (a session's tokens do not count)")
@click.option("--max-tokens", "max_tokens_limit", default=2048, show_default=True, type=click.IntRange(1),
              help="largest max_tokens a request may ask for (the model's context also caps it)")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="max_tokens of a request that gives none")
@click.option("--session-dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="keep sessions in this folder too: written after every turn, read back at start")
@click.option("--max-sessions", default=256, show_default=True, type=click.IntRange(1),
              help="sessions kept; the least recently used go first")
@click.option("--max-session-mb", default=256.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="MiB of carried state all sessions may hold together")
def main(bundles, max_session_mb, **options):
    """Serve the bundle folders BUNDLES over an OpenAI-compatible HTTP API (model id: the folder name)."""
    serve(list(bundles), ServeConfig(max_session_bytes=int(max_session_mb * MIB), **options))


if __name__ == "__main__":
    main()
