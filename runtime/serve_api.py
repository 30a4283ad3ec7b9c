"""The OpenAI wire format of itera-serve: request checking, response bodies, errors.

Pure functions over parsed JSON, no HTTP: every field a request may carry is checked here,
once, into a typed `Request`, and every refusal is an `ApiError` that the server turns into
an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`, with its status.
Fields OpenAI defines that this server cannot honour (n > 1, logprobs, tools, penalties) are
refused by name rather than ignored; fields it does not know are ignored, as OpenAI's are.

Extensions: `session` (a conversation whose carried state the server keeps, see
serve_sessions.py; or the `X-Itera-Session` header), `top_k` and `repetition_penalty`
(runtime/sampling.py's own settings).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingConfig

__all__ = ["ApiError", "Request", "parse_body", "parse_request", "SESSION_HEADER", "error_body", "usage",
           "completion_body", "chunk_body"]

SESSION_HEADER = "X-Itera-Session"
SESSION_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # also a file name: no leading dot, no slash
MAX_STOP = 16
MAX_STOP_CHARS = 256  # the held-back text is searched per token: a longer stop string costs every step


class ApiError(Exception):
    """A refused request: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Request:
    """One completion or chat request, checked."""

    kind: str  # "completion" | "chat"
    model: str | None
    prompt: str | None = None  # completion
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: role and text content
    max_tokens: int | None = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    stop: tuple[str, ...] = ()
    stream: bool = False
    session: str | None = None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (400 for anything else: bad UTF-8, bad JSON, NaN, nesting)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _bad("request body is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise _bad(f"request body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < low or (high is not None and v > high):
        bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise _bad(f"{name} must be an integer {bound}, got {json.dumps(v)[:40]}", name)
    return v


def _num_field(body: dict, name: str, default: float, ok, what: str) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or not ok(v):
        raise _bad(f"{name} must be {what}, got {json.dumps(v)[:40]}", name)
    return float(v)


def _text(v: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        out = []
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}: only text content parts are supported", where)
            out.append(part["text"])
        return "".join(out)
    raise _bad(f"{where} must be a string or a list of text parts", where)


def _unsupported(body: dict) -> None:
    """Refuse, by name, what OpenAI defines and this server would otherwise silently not do."""
    if body.get("n") not in (None, 1):
        raise _bad("n must be 1: this server returns one choice per request", "n")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of must be 1", "best_of")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs are not supported by this server", "logprobs")
    if body.get("echo") not in (None, False):
        raise _bad("echo is not supported by this server", "echo")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix (insertion) is not supported by this server", "suffix")
    for name in ("frequency_penalty", "presence_penalty"):
        v = body.get(name)
        if v is not None and (not _is_num(v) or v != 0):
            raise _bad(f"{name} is not supported (use the repetition_penalty extension)", name)
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias is not supported by this server", "logit_bias")
    for name in ("tools", "functions"):
        if body.get(name) not in (None, []):
            raise _bad(f"{name} are not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format must be {\"type\": \"text\"}", "response_format")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options must be an object", "stream_options")


def _session(body: dict, header: str | None) -> str | None:
    sid = body.get("session")
    if sid is not None and (not isinstance(sid, str) or not SESSION_ID.fullmatch(sid)):
        raise _bad("session must be 1-128 characters of letters, digits, '.', '_' or '-' (not starting with '.')",
                   "session")
    if header is not None:
        if not SESSION_ID.fullmatch(header):
            raise _bad(f"{SESSION_HEADER} must be 1-128 characters of letters, digits, '.', '_' or '-'", "session")
        if sid is not None and sid != header:
            raise _bad(f"the session field and the {SESSION_HEADER} header name different sessions", "session")
        sid = header
    return sid


def parse_request(body: dict, kind: str, session_header: str | None = None) -> Request:
    """Check a completion ("completion") or chat ("chat") request body into a `Request`."""
    _unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", "model")
    req = Request(kind=kind, model=model)
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt must be a string (or a list of one string)", "prompt")
        req.prompt = prompt
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _bad(f"{where} must be an object", where)
            role = m.get("role")
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise _bad(f"{where}.role must be system, user or assistant, got {json.dumps(role)[:40]}",
                           f"{where}.role")
            content = m.get("content")
            if role == "assistant" and content is None:
                raise _bad(f"{where}: assistant messages need text content (tool calls are not supported)",
                           f"{where}.content")
            req.messages.append({"role": role, "content": _text(content, f"{where}.content")})
    req.max_tokens = _int_field(body, "max_completion_tokens", 1)
    if req.max_tokens is None:
        req.max_tokens = _int_field(body, "max_tokens", 1)
    temperature = _num_field(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0 (0 is greedy)")
    top_p = _num_field(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    penalty = _num_field(body, "repetition_penalty", 1.0, lambda v: v > 0, "a number > 0 (1 is off)")
    top_k = _int_field(body, "top_k", 0) or 0
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0 or seed >= 2 ** 64):
        raise _bad("seed must be an integer in [0, 2^64)", "seed")
    req.sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                                  seed=seed)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP or any(
                not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise _bad(f"stop must be a non-empty string of at most {MAX_STOP_CHARS} characters, or a list of at "
                       f"most {MAX_STOP} of them", "stop")
        req.stop = tuple(stop)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream must be true or false", "stream")
    req.stream = bool(stream)
    req.session = _session(body, session_header)
    return req


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens the server did not compute again (a session's)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(kind: str, rid: str, model: str, text: str, finish_reason: str, use: dict,
                    session: dict | None) -> dict:
    created = int(time.time())
    if kind == "chat":
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason, "logprobs": None}], "usage": use}
    else:
        body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
                "usage": use}
    if session is not None:
        body["session"] = session
    return body


def chunk_body(kind: str, rid: str, model: str, text: str | None, finish_reason: str | None = None,
               use: dict | None = None, session: dict | None = None, first: bool = False) -> dict:
    """One server-sent event's data: a piece of text, or (finish_reason set) the last chunk with usage."""
    created = int(time.time())
    if kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    else:
        body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]}
    if use is not None:
        body["usage"] = use
    if session is not None:
        body["session"] = session
    return body
