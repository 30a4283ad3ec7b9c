"""itera-serve through the official `openai` client and raw sockets, against a real server process.

One server per module serves both committed golden bundles (tests/data, trained so that the
greedy text is a clear argmax at every step), so every greedy answer can be checked against
golden.json and `itera-run`. Tests that need other settings (sessions across a restart, an
API key, a tiny queue) start their own. No torch involved.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from itera_runtime.chat import PLAIN  # noqa: E402
from itera_runtime.errors import UserError  # noqa: E402
from itera_runtime.serve_process import ServerProcess  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "golden.json").read_text())
BUNDLES = {f: str(DATA / f"golden-{f}") for f in ("itera", "baseline")}
MODELS = {f: f"golden-{f}" for f in BUNDLES}
FAMILIES = sorted(BUNDLES)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sessions = tmp_path_factory.mktemp("sessions")
    with ServerProcess(list(BUNDLES.values()), ["--threads", "1", "--session-dir", sessions,
                                                "--max-body", 65536, "--body-timeout", 3]) as s:
        yield s


def client(url: str, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def api(server):
    return client(server.url)


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one request over a fresh connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode("utf-8", "replace")


def serves_next_request(api) -> None:
    """The server answers a good request correctly after whatever came before."""
    case = GOLDEN["itera"]
    out = api.completions.create(model=MODELS["itera"], prompt=case["prompt"], max_tokens=case["max_new_tokens"] // 4,
                                 temperature=0)
    assert case["text"].startswith(out.choices[0].text) and out.choices[0].text


# --------------------------------------------------------------------------- the API


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_greedy_text_is_itera_runs_and_streaming_gives_the_same_text(api, family):
    case = GOLDEN[family]
    run = subprocess.run([sys.executable, "-m", "itera_runtime.cli", BUNDLES[family], "--prompt", case["prompt"],
                          "-n", str(case["max_new_tokens"]), "--temperature", "0", "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    itera_run_text = json.loads(run.stdout)["text"]
    assert itera_run_text == case["text"]

    out = api.completions.create(model=MODELS[family], prompt=case["prompt"], max_tokens=case["max_new_tokens"],
                                 temperature=0)
    assert out.choices[0].text == itera_run_text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == case["max_new_tokens"]
    assert out.usage.prompt_tokens == len(case["prompt"].encode())  # a byte vocabulary: one token per byte
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    chunks = list(api.completions.create(model=MODELS[family], prompt=case["prompt"],
                                         max_tokens=case["max_new_tokens"], temperature=0, stream=True))
    assert len(chunks) > 2  # streamed, not one piece
    assert "".join(c.choices[0].text for c in chunks) == itera_run_text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == case["max_new_tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_renders_the_plain_template_and_streams_the_same_text(api, family):
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "To be, or not"}]
    prompt = PLAIN.render(messages)
    assert prompt == "A play.\n\nUser: To be, or not\nAssistant:"
    expected = api.completions.create(model=MODELS[family], prompt=prompt, max_tokens=24, temperature=0,
                                      stop=["\nUser:"]).choices[0].text
    out = api.chat.completions.create(model=MODELS[family], messages=messages, max_tokens=24, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(prompt.encode())

    chunks = list(api.chat.completions.create(model=MODELS[family], messages=messages, max_tokens=24,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_sampling_with_a_seed_repeats_and_stop_cuts_the_text(api):
    kw = dict(model=MODELS["itera"], prompt="To be", max_tokens=24, temperature=0.9, top_p=0.9, seed=7)
    a = api.completions.create(**kw).choices[0].text
    assert api.completions.create(**kw).choices[0].text == a
    greedy = GOLDEN["itera"]
    out = api.completions.create(model=MODELS["itera"], prompt=greedy["prompt"], max_tokens=48, temperature=0,
                                 stop=["question"])
    assert out.choices[0].text == greedy["text"][:greedy["text"].index("question")]
    assert out.choices[0].finish_reason == "stop"


def test_models_list_names_each_bundle_with_its_family_and_state(api):
    models = {m.id: m for m in api.models.list().data}
    assert set(models) == set(MODELS.values())
    assert models["golden-itera"].model_extra["family"] == "itera"
    assert models["golden-itera"].model_extra["state_kind"] == "ssm"
    assert models["golden-baseline"].model_extra["state_kind"] == "kv_buffer"
    assert models["golden-baseline"].model_extra["max_context"] == 256
    assert api.models.retrieve("golden-itera").id == "golden-itera"


@pytest.mark.parametrize("call, error, status", [
    (dict(model="no-such-model", prompt="x"), "NotFoundError", 404),
    (dict(model="golden-itera", prompt="x", max_tokens=0), "BadRequestError", 400),
    (dict(model="golden-itera", prompt="x", temperature=-0.5), "BadRequestError", 400),
    (dict(model="golden-itera", prompt="x", top_p=0), "BadRequestError", 400),
    (dict(model="golden-itera", prompt="x", n=2), "BadRequestError", 400),
    (dict(model="golden-itera", prompt="x", max_tokens=100000), "BadRequestError", 400),
    (dict(model="golden-baseline", prompt="y" * 300), "BadRequestError", 400),  # over its 256-token context
    (dict(model="golden-baseline", prompt="y" * 200, max_tokens=100), "BadRequestError", 400),
    (dict(model="golden-itera", prompt="x", logprobs=2), "BadRequestError", 400),
])
def test_bad_requests_are_openai_errors_with_their_status_and_the_server_goes_on(api, call, error, status):
    with pytest.raises(getattr(openai, error)) as info:
        api.completions.create(**call)
    assert info.value.status_code == status
    assert info.value.body["message"]  # OpenAI's error object: the client unwraps {"error": {...}}
    serves_next_request(api)


def test_a_session_of_another_model_is_a_409(api):
    api.completions.create(model=MODELS["itera"], prompt="To be", max_tokens=2, temperature=0,
                           extra_body={"session": "owned-by-itera"})
    with pytest.raises(openai.ConflictError) as info:
        api.completions.create(model=MODELS["baseline"], prompt="To be", max_tokens=2,
                               extra_headers={"X-Itera-Session": "owned-by-itera"})
    assert info.value.body["code"] == "session_model_mismatch"
    serves_next_request(api)


# --------------------------------------------------------------------------- sessions


TURNS = ["To be", "or not", "Whether", "The slings", "Or to take"]  # short: the baseline's context is 256 bytes


def chat(api, family: str, turns, session: str | None, history=None):
    """Greedy replies to `turns`, each request re-sending the whole history; (replies, cached tokens)."""
    history = list(history or [])
    replies, cached = [], []
    for text in turns:
        history.append({"role": "user", "content": text})
        out = api.chat.completions.create(model=MODELS[family], messages=history, max_tokens=8, temperature=0,
                                          extra_body={"session": session} if session else None)
        reply = out.choices[0].message.content
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
        if session:
            assert out.model_extra["session"]["cached_tokens"] == cached[-1]
    return replies, cached, history


@pytest.mark.parametrize("family", FAMILIES)
def test_a_five_turn_chat_with_a_session_gives_the_text_of_resending_it_without_one(api, family):
    plain, plain_cached, _ = chat(api, family, TURNS, None)
    assert plain_cached == [0] * 5
    kept, cached, _ = chat(api, family, TURNS, f"five-{family}")
    assert kept == plain
    # from the second turn on, everything before the new user turn came from the session
    assert cached[0] == 0 and all(b > a > 0 for a, b in zip(cached[1:], cached[2:]))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_session_continues_the_same_after_the_server_restarts(family, tmp_path):
    sessions = tmp_path / "sessions"
    with ServerProcess([BUNDLES[family]], ["--threads", "1", "--session-dir", sessions]) as s:
        api = client(s.url)
        _, cached, history = chat(api, family, TURNS, f"chat-{family}")
        next_turn = ["To die"]
        expected, _, _ = chat(api, family, next_turn, None, history)
    assert (sessions / f"chat-{family}.itera-state").is_file()
    with ServerProcess([BUNDLES[family]], ["--threads", "1", "--session-dir", sessions]) as s:
        assert "1 session(s) restored" in "\n".join(s.lines)
        after, cached_after, _ = chat(client(s.url), family, next_turn, f"chat-{family}", history)
    assert after == expected
    assert cached_after[0] > cached[-1]


def test_a_session_whose_text_does_not_continue_starts_afresh(api):
    first = api.completions.create(model=MODELS["itera"], prompt="To be, or not", max_tokens=8, temperature=0,
                                   extra_body={"session": "restart-me"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cont = api.completions.create(model=MODELS["itera"], prompt="To be, or not" + first.choices[0].text + " to",
                                  max_tokens=8, temperature=0, extra_body={"session": "restart-me"})
    assert cont.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
    other = api.completions.create(model=MODELS["itera"], prompt="Something else", max_tokens=8, temperature=0,
                                   extra_body={"session": "restart-me"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    alone = api.completions.create(model=MODELS["itera"], prompt="Something else", max_tokens=8, temperature=0)
    assert other.choices[0].text == alone.choices[0].text


def test_sessions_are_bounded_least_recently_used_first(tmp_path):
    sessions = tmp_path / "s"
    with ServerProcess([BUNDLES["itera"]], ["--threads", "1", "--session-dir", sessions, "--max-sessions", 2]) as s:
        api = client(s.url)
        for sid in ("a", "b", "a", "c"):  # b is the least recently used when c arrives
            api.completions.create(model=MODELS["itera"], prompt="To be", max_tokens=2, extra_body={"session": sid})
        health = raw(s.url, "GET", "/health")[1]
    assert health["sessions"]["count"] == 2
    assert sorted(p.name for p in sessions.iterdir()) == ["a.itera-state", "c.itera-state"]


# --------------------------------------------------------------------------- safety


def test_an_api_key_is_required_when_given(tmp_path):
    with ServerProcess([BUNDLES["itera"]], ["--threads", "1", "--api-key", "s3cret"]) as s:
        with pytest.raises(openai.AuthenticationError) as info:
            client(s.url, api_key="wrong").models.list()
        assert info.value.status_code == 401
        assert raw(s.url, "GET", "/v1/models")[0] == 401
        assert [m.id for m in client(s.url, api_key="s3cret").models.list().data] == ["golden-itera"]
        assert raw(s.url, "GET", "/health")[1] == {"status": "ok"}  # no details without the key


@pytest.mark.parametrize("body", [
    b"{bad json", b"[1, 2]", b"\xff\xfe not utf-8", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": "10"}',
    b'{"prompt": "x", "max_tokens": true}', b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "stream": "yes"}',
    b'{"prompt": "x", "stop": [""]}', b'{"prompt": "x", "seed": -1}', b'{"prompt": "x", "session": "../etc"}',
    b'{"prompt": "\\ud800"}', b'{"prompt": "x", "top_k": -1}', b"[" * 30000 + b"]" * 30000,
    b'{"prompt": "x", "model": 3}', b'{"prompt": "x", "stop": "' + b"s" * 300 + b'"}',
    b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}',
])
def test_malformed_completion_bodies_are_400_json_errors(server, api, body):
    status, data = raw(server.url, "POST", "/v1/completions", body)
    assert status == 400, data
    assert set(data["error"]) == {"message", "type", "param", "code"}
    serves_next_request(api)


@pytest.mark.parametrize("body", [
    b'{"messages": []}', b'{"messages": "hi"}', b'{"messages": [{"role": "tool", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": 5}]}', b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"messages": [{"role": "assistant"}]}', b'{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}',
])
def test_malformed_chat_bodies_are_400_json_errors(server, api, body):
    status, data = raw(server.url, "POST", "/v1/chat/completions", body)
    assert status == 400, data
    assert data["error"]["message"]
    serves_next_request(api)


def test_wrong_paths_methods_and_oversized_bodies_are_4xx_json(server, api):
    assert raw(server.url, "GET", "/v1/nothing")[0] == 404
    status, data = raw(server.url, "GET", "/v1/completions")
    assert status == 405 and data["error"]["code"] == "method_not_allowed"
    big = json.dumps({"model": "golden-itera", "prompt": "x" * 70000}).encode()
    status, data = raw(server.url, "POST", "/v1/completions", big)
    assert status == 413 and data["error"]["code"] == "request_too_large"
    serves_next_request(api)


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_random_bytes_and_a_slow_client_do_not_stop_the_server(server, api):
    rng = __import__("random").Random(0)
    for _ in range(5):
        with socket.create_connection(_host_port(server.url), timeout=10) as sock:
            sock.sendall(bytes(rng.randrange(256) for _ in range(4096)))
            try:
                reply = sock.recv(1024)
            except (ConnectionResetError, socket.timeout):
                reply = b""
            assert reply == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply[:40]  # 4xx, or closed
    serves_next_request(api)

    # a client that sends half a body and stops: answered 408 after --body-timeout (3 s), the
    # server serving others meanwhile
    with socket.create_connection(_host_port(server.url), timeout=20) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        serves_next_request(api)
        reply = slow.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    serves_next_request(api)


# --------------------------------------------------------------------------- load


def stream_text(url: str, model: str, prompt: str, max_tokens: int) -> str:
    api = client(url)
    return "".join(c.choices[0].text for c in api.completions.create(model=model, prompt=prompt,
                                                                      max_tokens=max_tokens, temperature=0,
                                                                      stream=True))


@pytest.mark.slow
def test_sixteen_concurrent_streaming_clients_all_get_the_right_text(server):
    case = GOLDEN["itera"]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        family = FAMILIES[i % 2]
        try:
            results[i] = stream_text(server.url, MODELS[family], GOLDEN[family]["prompt"], case["max_new_tokens"])
        except BaseException as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert time.monotonic() - start < 120
    for i in range(16):
        assert results[i] == GOLDEN[FAMILIES[i % 2]]["text"], i
    # memory under load: both bundles and 16 streams peaked at 115 MiB here (107 MiB after loading)
    peak = server.peak_rss_bytes()
    assert peak is None or peak < 200 * (1 << 20), peak


def test_batched_decoding_gives_each_request_the_text_it_gets_alone(server, api):
    """The module's server batches the Itera-Lite bundle's decode steps (up to 4 rows)."""
    assert raw(server.url, "GET", "/health")[1]["models"]["golden-itera"]["batched"] is True
    prompts = ["To be, or not", "Whether 'tis", "The slings and", "And by opposing", "Or to take arms", "To be"]
    calls = [dict(prompt=p, max_tokens=24, temperature=0) for p in prompts]
    calls += [dict(prompt=p, max_tokens=24, temperature=0.9, top_p=0.9, seed=i) for i, p in enumerate(prompts)]
    alone = [api.completions.create(model=MODELS["itera"], **c).choices[0].text for c in calls]
    together: dict[int, str] = {}

    def one(i: int) -> None:
        together[i] = stream_text_of(server.url, calls[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [together.get(i) for i in range(len(calls))] == alone


def stream_text_of(url: str, call: dict) -> str:
    return "".join(c.choices[0].text for c in client(url).completions.create(model=MODELS["itera"], stream=True,
                                                                              **call))


def _start_stream(url: str, body: dict) -> socket.socket:
    """A streaming request on a raw socket, its headers and first event read."""
    sock = socket.create_connection(_host_port(url), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:80]
    return sock


LONG = 1_000_000  # tokens: a request that cannot finish within any of these tests' time limits


def test_a_full_queue_is_503_and_a_killed_client_frees_its_slot(tmp_path):
    # The golden model decodes up to ~7,000 tokens/s on a quiet machine: a long request must be
    # long in time on any machine, so the server lets it ask for far more than it will ever get.
    long = {"model": "golden-itera", "prompt": "To be", "max_tokens": LONG, "temperature": 0, "stream": True}
    with ServerProcess([BUNDLES["itera"]], ["--threads", "1", "--parallel", 1, "--queue", 0, "--max-tokens", LONG]) as s:
        sock = _start_stream(s.url, long)  # takes the only slot for seconds
        status, data = raw(s.url, "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode())
        assert status == 503 and data["error"]["code"] == "queue_full"
        with pytest.raises(openai.InternalServerError) as info:
            client(s.url).completions.create(model="golden-itera", prompt="x", max_tokens=2)
        assert info.value.status_code == 503
        sock.close()  # the client goes away mid-stream: its generation stops, its slot is free
        deadline = time.monotonic() + 10
        while raw(s.url, "GET", "/health")[1]["models"]["golden-itera"]["active"]:
            assert time.monotonic() < deadline, "the killed client's generation kept its slot"
            time.sleep(0.05)
        serves_next_request(client(s.url))


def test_a_request_over_its_timeout_is_504_and_frees_its_slot(tmp_path):
    with ServerProcess([BUNDLES["itera"]], ["--threads", "1", "--request-timeout", 0.3, "--no-batch",
                                            "--max-tokens", LONG]) as s:
        assert raw(s.url, "GET", "/health")[1]["models"]["golden-itera"]["batched"] is False
        status, data = raw(s.url, "POST", "/v1/completions",
                           json.dumps({"prompt": "To be", "max_tokens": LONG, "temperature": 0}).encode())
        assert status == 504 and data["error"]["code"] == "timeout"
        assert raw(s.url, "GET", "/health")[1]["models"]["golden-itera"]["active"] == 0


def test_itera_serve_refuses_a_busy_port_and_a_missing_bundle_in_one_line(server):
    port = server.url.rsplit(":", 1)[1]
    run = subprocess.run([sys.executable, "-m", "itera_runtime.serve", BUNDLES["itera"], "--port", port],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 127.0.0.1:" + port)
    run = subprocess.run([sys.executable, "-m", "itera_runtime.serve", "/nonexistent/bundle"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "does not exist" in run.stderr


def test_a_server_that_cannot_start_is_one_error_naming_its_reason():
    """ServerProcess (itera-bench serve, the pipeline) passes on the server's own reason, one `error:` deep."""
    with pytest.raises(UserError) as e:
        ServerProcess(["/nonexistent/bundle"])
    msg = str(e.value)
    assert msg.startswith("itera-serve did not start: ") and "does not exist" in msg and "error:" not in msg, msg


# --------------------------------------------------------------------------- itera-bench serve


@pytest.mark.slow
def test_itera_bench_serve_measures_a_running_server_and_the_session_skips_the_history(server):
    run = subprocess.run([sys.executable, "-m", "itera_bench.cli", "serve", BUNDLES["itera"], "--url", server.url,
                          "-c", "1,2", "-p", "16", "-n", "8", "--chat-turns", "3", "--chat-gen", "4", "-r", "2",
                          "-o", "jsonl"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    by = {(r["test"], r["metric"]): r for r in rows}
    for c in (1, 2):
        for metric in ("time_to_first_token", "tokens_per_s_per_client", "tokens_per_s_total"):
            row = by[(f"c{c} pp16+tg8 batched", metric)]  # the module's server batches this bundle
            assert len(row["samples"]) == 2 and all(v > 0 for v in row["samples"])
            assert row["kind"] == "serve" and row["family"] == "itera" and row["extra"]["parallel"] == 4
    assert by[("graph b2", "tokens_per_s_total")]["median"] > 0
    session = by[("chat3 session batched", "time_to_first_token")]
    resend = by[("chat3 resend batched", "time_to_first_token")]
    assert session["extra"]["last_cached_tokens"] > 0 and resend["extra"]["last_cached_tokens"] == 0
    assert session["extra"]["last_prompt_tokens"] == resend["extra"]["last_prompt_tokens"]
    assert len(session["extra"]["ttft_ms_per_turn"]) == 3
