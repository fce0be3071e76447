"""``salm serve`` at its edges: the door of the API (key first, body cap), a loop that stays responsive while
prompts are tokenized, out-of-range seeds, internal errors that keep the connection, and flags checked up front.

The server here is a real uvicorn server on 127.0.0.1, run in this process (on a thread) so a test can hold
its tokenizer or fail its engine; clients are raw sockets and ``http.client`` where the test needs to see the
connection itself (what was read, whether it was reused).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve tests need the serve extra (fastapi, uvicorn)")
uvicorn = pytest.importorskip("uvicorn", reason="the serve tests need the serve extra (fastapi, uvicorn)")

KEY = "sekret"
CAP = 64 * 1024  # this server's --max_body_bytes
GATE = "<hold the tokenizer>"  # a prompt holding this waits in the tokenizer until the test lets it go
FAIL_STOP = "<fail in submit>"  # a request with this stop string raises inside the engine's submit


class GatedTokenizer:
    """The model's tokenizer, except that a text holding GATE waits in it until ``release`` is set."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, text, **kw):
        if GATE in text:
            self.entered.set()
            self.release.wait(60)
        return self._tokenizer(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def edge_server(tiny_infos):
    """The app with an API key and a 64 KiB body cap, on an engine whose submit fails on FAIL_STOP."""
    import torch

    from salm.ensemble import MultiModelWithScalarHeads
    from salm.serve.app import create_app
    from salm.serve.engine import Engine
    from salm.serve.settings import ServeSettings

    class FaultyEngine(Engine):
        def submit(self, prompt_ids, params, sink):
            if FAIL_STOP in params.stop:
                raise RuntimeError("injected fault")
            return super().submit(prompt_ids, params, sink)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MultiModelWithScalarHeads(tiny_infos, device="cpu").eval()
    model.tokenizer = GatedTokenizer(model.tokenizer)
    app = create_app(FaultyEngine(model, max_batch=2), ServeSettings(api_key=KEY, max_body_bytes=CAP))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    server.port, server.tokenizer = port, model.tokenizer
    yield server
    server.should_exit = True
    thread.join(30)
    torch.set_num_threads(threads)


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Read one whole response (status, lower-cased headers, JSON body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


def _raw(server, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], dict]:
    """Send ``head`` and ``body`` (which may be less than the head announces), read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body)
        return _response(sock)


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


# ---------------------------------------------------------------------- the door: key first, then the body cap
def test_the_api_key_is_checked_before_the_body_is_read(edge_server):
    # The head announces a body that never comes: only a server that answers without reading it replies.
    status, _, body = _raw(edge_server, _head("/v1/completions", {"Content-Length": "1000"}))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer nope", "Content-Length": "20"}
    status, _, body = _raw(edge_server, _head("/v1/completions", wrong), b"{not json at all...}")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # not parsed: no 400 about the JSON


def test_a_content_length_over_the_cap_is_refused_without_reading_the_body(edge_server):
    status, headers, body = _raw(edge_server, _head("/v1/completions", dict(AUTH, **{"Content-Length": "10" * 5})))
    assert status == 413 and headers["connection"] == "close"
    assert body["error"] == {
        "message": f"the request body is {'10' * 5} bytes, over this server's limit of {CAP} bytes "
        "(salm serve --max_body_bytes)",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }


def test_a_chunked_body_is_cut_off_once_it_passes_the_cap(edge_server):
    # CAP + 1 bytes of a chunked body that never ends: the 413 must come from reading, not from the end.
    head = _head("/v1/completions", dict(AUTH, **{"Transfer-Encoding": "chunked"}))
    piece = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(CAP // len(piece))) + b"1\r\nx\r\n"
    status, headers, body = _raw(edge_server, head, chunks)
    assert status == 413 and headers["connection"] == "close"
    assert body["error"]["message"] == (
        f"the request body is over this server's limit of {CAP} bytes (salm serve --max_body_bytes)"
    )


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 413)])
def test_a_body_of_exactly_the_cap_is_accepted(edge_server, extra, status):
    body = {"model": "salm", "prompt": "x", "max_tokens": 1, "user": ""}
    body["user"] = "u" * (CAP + extra - len(json.dumps(body)))
    data = json.dumps(body).encode()
    assert len(data) == CAP + extra
    got, _, answer = _raw(edge_server, _head("/v1/completions", dict(AUTH, **{"Content-Length": str(len(data))})), data)
    assert got == status, answer


# ---------------------------------------------------------------------- the event loop stays free
def test_health_answers_while_a_prompt_is_being_tokenized(edge_server):
    tokenizer = edge_server.tokenizer
    tokenizer.entered.clear()
    tokenizer.release.clear()
    body = {"model": "salm", "prompt": GATE + " hello", "max_tokens": 2, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, edge_server, "/v1/completions", body)
        try:
            assert tokenizer.entered.wait(30), "the request never reached the tokenizer"
            conn = http.client.HTTPConnection("127.0.0.1", edge_server.port, timeout=10)
            conn.request("GET", "/health")  # on a server tokenizing on its event loop, this waits (times out)
            health = conn.getresponse()
            assert health.status == 200 and json.loads(health.read())["status"] == "ok"
            assert not pending.done()  # the prompt is still in the tokenizer
        finally:
            tokenizer.release.set()
        status, answer = pending.result(timeout=30)
    assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer


def _post(server, path: str, body: dict, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    conn = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers=AUTH)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


# ---------------------------------------------------------------------- bad seeds, internal errors: no reset
@pytest.mark.parametrize("seed, ok", [(2**70, False), (2**63, False), (-1, False), (2**63 - 1, True)])
def test_seeds_outside_salms_range_are_a_400_naming_seed(edge_server, seed, ok):
    conn = http.client.HTTPConnection("127.0.0.1", edge_server.port, timeout=30)
    body = {"model": "salm", "prompt": "x", "max_tokens": 2, "temperature": 1.0, "seed": seed}
    status, answer = _post(edge_server, "/v1/completions", body, conn)
    if ok:
        assert status == 200, answer
    else:
        assert status == 400 and answer["error"]["param"] == "seed", answer
    port = conn.sock.getsockname()[1]
    status, answer = _post(edge_server, "/v1/completions", dict(body, seed=0), conn)  # the lowest seed
    assert status == 200, answer
    assert conn.sock.getsockname()[1] == port  # the same connection answered both


def test_an_internal_error_is_a_500_and_the_connection_stays_usable(edge_server):
    conn = http.client.HTTPConnection("127.0.0.1", edge_server.port, timeout=30)
    body = {"model": "salm", "prompt": "x", "max_tokens": 2, "temperature": 0}
    status, answer = _post(edge_server, "/v1/completions", dict(body, stop=[FAIL_STOP]), conn)
    assert status == 500
    assert answer["error"]["message"] == "internal error: RuntimeError: injected fault"
    assert answer["error"]["type"] == "server_error"
    port = conn.sock.getsockname()[1]
    status, answer = _post(edge_server, "/v1/completions", body, conn)
    assert status == 200 and answer["usage"]["completion_tokens"] == 2
    assert conn.sock.getsockname()[1] == port


# ---------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max_batch", "0", "--max_batch must be >= 1, got 0"),
        ("--max_queue", "-1", "--max_queue must be >= 0, got -1"),
        ("--port", "99999", "--port must be a TCP port, 1 to 65535, got 99999"),
        ("--port", "0", "--port must be a TCP port, 1 to 65535, got 0"),
        ("--shutdown_grace", "-1", "--shutdown_grace must be a number of seconds >= 0, got -1.0"),
        ("--shutdown_grace", "nan", "--shutdown_grace must be a number of seconds >= 0, got nan"),
        ("--max_body_bytes", "0", "--max_body_bytes must be >= 1, got 0"),
        ("--api_key", "", "--api_key is empty; leave it out for an open server"),
        ("--model_name", "", "--model_name is empty"),
    ],
)
def test_bad_serve_flags_fail_before_any_member_loads(tmp_path, capsys, flag, value, message):
    from salm.cli import main

    # The heads folder does not exist: a command that loaded anything first would fail on it instead.
    code = main(["serve", "--weights", str(tmp_path / "no-heads"), "--device", "cpu", flag, value])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"salm serve: error: {message}\n"
