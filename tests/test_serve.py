"""``salm serve``: a real uvicorn server in a subprocess, talked to with the official ``openai`` client.

Every answer is compared with ``model.generate`` on the same heads and members, so the tests pin the
server (and its continuous batching) to the library's decoding, not to recorded outputs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (openai)")
httpx = pytest.importorskip("httpx", reason="the serve tests need the dev extra (httpx)")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the serve tests need the serve extra (fastapi, uvicorn)")

from tests.conftest import FinishedTexts, modules_imported_by  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "sekret"
FAIL_T = 1.234  # the restricted server fails requests with this temperature (tests/serve_launcher.py)
FAIL_LATE_T = 1.345  # ... and these from their third token on
PROMPTS = [
    "Question: what is two plus three?\nAnswer:\n",
    "def add",
    "The patient presented with fever and cough; the doctor",
    "Tom has 12 apples.",
]


# ---------------------------------------------------------------------- servers
class Server:
    def __init__(self, root: Path, weights: Path, *flags: str, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"server-{self.port}.log"
        cmd = [sys.executable, str(REPO / "tests" / "serve_launcher.py"), "serve", "--weights", str(weights)]
        cmd += ["--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port), *flags]
        full_env = dict(os.environ, SALM_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"), **(env or {}))
        full_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # 2 shared cores: threads only contend
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    def ready(self) -> Server:
        """Wait until /health answers (servers start in parallel; each waits here when first used)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in 120 s:\n{self.log.read_text()}")

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def wait_for(self, cond, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if cond(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"health never matched; last {self.health()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def heads(tiny_infos, tmp_path_factory) -> Path:
    """Heads saved with their member set; the server loads the members the config names. They are of the
    ``confidence`` router (training's default), whose input includes every member's next-token statistics."""
    from salm.ensemble import MultiModelWithScalarHeads

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("heads")
    MultiModelWithScalarHeads(tiny_infos, device="cpu", router="confidence").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(heads):
    """The same ensemble in this process: what every server answer must equal."""
    from salm.ensemble import MultiModelWithScalarHeads

    return MultiModelWithScalarHeads.from_pretrained(heads, device="cpu")


@pytest.fixture(scope="module")
def servers(heads, tmp_path_factory):
    """Both module servers, started together (startup is mostly imports: overlapping them saves time)."""
    env = {"SALM_TEST_STEP_DELAY": "0.03", "SALM_TEST_NO_EOS": "1", "SALM_TEST_FAIL_TEMPERATURE": str(FAIL_T)}
    env["SALM_TEST_FAIL_LATE_TEMPERATURE"] = str(FAIL_LATE_T)
    flags = ("--api_key", KEY, "--max_batch", "1", "--max_queue", "1")
    started = {
        "plain": Server(tmp_path_factory.mktemp("srv"), heads),
        # one slot, one queue place, an API key, slow steps, no EOS, and a fault on one temperature
        "restricted": Server(tmp_path_factory.mktemp("srv"), heads, *flags, env=env),
    }
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["plain"].ready()


@pytest.fixture(scope="module")
def restricted(servers):
    return servers["restricted"].ready()


def _gen(reference, prompt: str, **kw):
    """``generate`` here, on one thread like the server (the same reduction order, so bit-equal logits)."""
    kw.setdefault("temperature", 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference.generate(prompt, return_outputs=True, **kw)
    finally:
        torch.set_num_threads(threads)


def _stream_text(stream, chat: bool) -> tuple[str, str | None, list]:
    text, finish, attribution = [], None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        text.append((c.delta.content or "") if chat else c.text)
        finish = c.finish_reason or finish
        attribution += getattr(c, "attribution", None) or []
    return "".join(text), finish, attribution


# ---------------------------------------------------------------------- endpoints and equivalences
def test_models_lists_the_ensemble_and_each_member(server, reference):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["salm"] + [f"salm/member:{m}" for m in reference.model_ids]
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_tokens=12, temperature=0.0),
        dict(max_tokens=10, temperature=0.9, top_p=0.8, seed=7),
        dict(max_tokens=15, temperature=0.0, routing="mixture"),
        dict(max_tokens=30, temperature=0.0, stop=["e", "a"]),
    ],
)
def test_completion_streamed_equals_plain_equals_generate(server, reference, settings):
    client = server.client()
    extra = {"routing": settings.pop("routing")} if "routing" in settings else {}
    want = _gen(
        reference, PROMPTS[0], max_new_tokens=settings["max_tokens"], temperature=settings["temperature"],
        top_p=settings.get("top_p", 1.0), seed=settings.get("seed"), stop=settings.get("stop"), **extra,
    )  # fmt: skip
    kw = dict(model="salm", prompt=PROMPTS[0], extra_body=extra, **settings)
    plain = client.completions.create(**kw)
    streamed, finish, _ = _stream_text(client.completions.create(stream=True, **kw), chat=False)
    assert plain.choices[0].text == streamed == want.text
    reason = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}[want.stop_reason]
    assert plain.choices[0].finish_reason == finish == reason
    n_prompt = len(reference.tokenizer(PROMPTS[0])["input_ids"])
    assert plain.usage.prompt_tokens == n_prompt
    assert plain.usage.completion_tokens == len(want.token_ids)
    assert plain.usage.total_tokens == n_prompt + len(want.token_ids)
    if "stop" in settings:
        assert want.stop_reason == "stop"  # the test really exercises a stop string


def test_seed_makes_sampling_repeatable(server):
    client = server.client()
    kw = dict(model="salm", prompt=PROMPTS[1], max_tokens=12, temperature=1.0)
    a, b = (client.completions.create(seed=3, **kw).choices[0].text for _ in range(2))
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (4, 5, 6)}
    assert a == b
    assert others - {a}  # another seed gives another answer


def test_chat_uses_the_plain_template_when_the_tokenizer_has_none(server, reference):
    from salm.data import build_prompt

    assert not getattr(reference.tokenizer, "chat_template", None)
    messages = [{"role": "user", "content": "what is two plus three?"}]
    want = _gen(reference, build_prompt("what is two plus three?"), max_new_tokens=10)
    client = server.client()
    plain = client.chat.completions.create(model="salm", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model="salm", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed, _, _ = _stream_text(chunks, chat=True)
    assert plain.choices[0].message.content == streamed == want.text
    assert plain.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == len(want.token_ids)


def test_render_chat_uses_the_tokenizers_template(reference):
    from salm.serve.prompts import render_chat
    from salm.serve.protocol import ChatMessage

    tok = reference.tokenizer
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert render_chat(tok, msgs) == ("Be brief.\n\nQuestion: Hi\nAnswer:\n", False)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    try:
        assert render_chat(tok, msgs) == ("<system>Be brief.<user>Hi<assistant>", True)
    finally:
        tok.chat_template = None


def test_member_model_id_forces_that_member(server, reference):
    mid = reference.model_ids[1]
    want = _gen(reference, PROMPTS[2], max_new_tokens=10, routing=f"member:{mid}", return_decisions=False)
    got = server.client().completions.create(
        model=f"salm/member:{mid}", prompt=PROMPTS[2], max_tokens=10, temperature=0, extra_body={"attribution": True}
    )
    assert got.choices[0].text == want.text
    assert {a["member"] for a in got.choices[0].attribution} == {mid}


def test_attribution_and_logprobs(server, reference):
    want = _gen(reference, PROMPTS[3], max_new_tokens=8)
    got = server.client().completions.create(
        model="salm", prompt=PROMPTS[3], max_tokens=8, temperature=0, logprobs=2, extra_body={"attribution": True}
    )
    c = got.choices[0]
    assert [a["token_id"] for a in c.attribution] == want.token_ids
    assert [a["member"] for a in c.attribution] == [d.member for d in want.decisions]
    for a, d in zip(c.attribution, want.decisions):
        assert a["routing_probs"] == pytest.approx(d.routing_probs, abs=1e-5)
    assert len(c.logprobs.tokens) == len(want.token_ids)
    for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert lp <= 0 and len(top) == 2
        assert lp == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely one


def test_eight_concurrent_streams_each_get_what_they_get_alone(server, reference):
    routings = ["argmax", "mixture", f"member:{reference.model_ids[0]}", "threshold:0.4"]
    jobs = [
        dict(prompt=PROMPTS[i % 4], max_tokens=6 + 5 * i, routing=routings[i % 4], stop=["\n\n"] if i % 3 else None)
        for i in range(8)
    ]
    want = [
        _gen(reference, j["prompt"], max_new_tokens=j["max_tokens"], routing=j["routing"], stop=j["stop"]).text
        for j in jobs
    ]
    barrier = threading.Barrier(len(jobs))

    def run(job):
        client = server.client()
        barrier.wait()
        stream = client.completions.create(
            model="salm", prompt=job["prompt"], max_tokens=job["max_tokens"], temperature=0, stop=job["stop"],
            stream=True, extra_body={"routing": job["routing"]},
        )  # fmt: skip
        return _stream_text(stream, chat=False)[0]

    before = server.health()["steps"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    assert got == want
    steps = server.health()["steps"] - before
    assert steps < sum(j["max_tokens"] for j in jobs) / 2  # they really shared decode steps


# ---------------------------------------------------------------------- failures
def _post(url: str, body: str | dict, key: str | None = None, timeout: float | httpx.Timeout = 30) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url, content=data, headers=headers, timeout=timeout)


@pytest.mark.parametrize(
    "body, status, param, message",
    [
        ('{"model": "salm", "prompt": "x",', 400, None, "not valid JSON"),
        ({"model": "salm"}, 400, "prompt", "missing required field 'prompt'"),
        ({"model": "salm", "prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
        ({"model": "salm", "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
        ({"model": "salm", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({"model": "salm", "prompt": "x", "n": 2}, 400, "n", "only n=1 is supported"),
        ({"model": "salm", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"model": "salm", "prompt": "x", "routing": "best"}, 400, "routing", "unknown routing 'best'"),
        ({"model": "salm", "prompt": "x", "routing": "member:nobody"}, 400, "routing", "unknown member 'nobody'"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model", "the model 'gpt-4' does not exist"),
        ({"model": "salm", "prompt": "a b " * 300}, 400, "prompt", "this model's context is 256 tokens"),
        ('{"model": "salm", "prompt": "x\\ud800"}', 400, "prompt", "unpaired surrogate at position 1"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param, message):
    r = _post(server.url + "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert message in err["message"]
    assert err["type"] == "invalid_request_error"


def test_the_openai_client_raises_on_bad_parameters(server):
    with pytest.raises(openai.BadRequestError, match="only n=1 is supported"):
        server.client().chat.completions.create(model="salm", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        server.client().chat.completions.create(model="salm", messages=[{"role": "user", "content": "a b " * 300}])


def test_api_key(restricted):
    url = restricted.url + "/v1/completions"
    body = {"model": "salm", "prompt": "x", "max_tokens": 2}
    assert _post(url, body).status_code == 401
    wrong = _post(url, body, key="wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        restricted.client("wrong").models.list()
    assert restricted.client(KEY).completions.create(**body).usage.completion_tokens == 2
    assert httpx.get(restricted.url + "/health").status_code == 200  # health and the page stay open


def _open_stream(s: Server, max_tokens: int) -> tuple[httpx.Client, httpx.Response]:
    """A streamed completion whose first chunk has arrived (so it holds a decode slot)."""
    c = httpx.Client(timeout=30)
    body = {"model": "salm", "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    r = c.send(
        c.build_request("POST", s.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}),
        stream=True,
    )
    assert r.status_code == 200
    r.lines = r.iter_lines()  # kept on the response: a collected generator would close the stream
    assert next(line for line in r.lines if line.startswith("data: "))
    return c, r


def test_full_queue_is_429_and_the_waiting_request_runs_later(restricted):
    c, running = _open_stream(restricted, max_tokens=200)  # holds the only slot for ~6 s
    waiting = ThreadPoolExecutor(1).submit(
        restricted.client(KEY).completions.create, model="salm", prompt="x", max_tokens=3, temperature=0
    )
    restricted.wait_for(lambda h: h["waiting"] == 1)
    with pytest.raises(openai.RateLimitError, match="the queue is full") as full:
        restricted.client(KEY).completions.create(model="salm", prompt="x", max_tokens=3)
    assert full.value.response.headers["retry-after"] == "1"
    running.close()
    c.close()
    assert waiting.result(timeout=30).usage.completion_tokens == 3


def test_a_client_that_disconnects_frees_its_slot(restricted):
    c, r = _open_stream(restricted, max_tokens=250)  # ~8 s if nobody stopped it
    assert restricted.health()["running"] == 1
    r.close()
    c.close()
    h = restricted.wait_for(lambda h: h["running"] == 0, timeout=3)
    time.sleep(0.3)
    assert restricted.health()["steps"] - h["steps"] <= 1  # nothing decodes for the gone client
    got = restricted.client(KEY).completions.create(model="salm", prompt="x", max_tokens=2, temperature=0)
    assert got.usage.completion_tokens == 2


def test_a_non_streaming_client_that_leaves_is_cancelled_within_two_steps(restricted):
    before = restricted.health()["steps"]
    body = {"model": "salm", "prompt": PROMPTS[0], "max_tokens": 250, "temperature": 0}  # ~8 s of steps
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s (curl -m) and closes its socket
        _post(restricted.url + "/v1/completions", body, key=KEY, timeout=httpx.Timeout(30, read=0.5))
    left = restricted.health()["steps"]
    h = restricted.wait_for(lambda h: h["running"] == 0, timeout=3)
    assert h["steps"] - left <= 2  # it stopped within two steps of the client leaving
    time.sleep(0.3)
    assert restricted.health()["steps"] == h["steps"]  # and nothing decodes for it since
    assert 0 < left - before < 125  # it was decoding when the client left, and far from done
    got = restricted.client(KEY).completions.create(model="salm", prompt="x", max_tokens=2, temperature=0)
    assert got.usage.completion_tokens == 2


def test_an_exception_in_one_request_fails_only_that_request(restricted):
    client = restricted.client(KEY)
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        client.completions.create(model="salm", prompt="x", max_tokens=3, temperature=FAIL_T)
    assert client.completions.create(model="salm", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens == 3
    assert restricted.proc.poll() is None


def test_an_exception_mid_stream_ends_that_stream_with_an_error_chunk(restricted):
    client = restricted.client(KEY)
    stream = client.completions.create(model="salm", prompt="x", max_tokens=20, temperature=FAIL_LATE_T, stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="injected late fault"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert len(texts) == 2  # two tokens streamed before the fault
    assert client.completions.create(model="salm", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_sigterm_finishes_in_flight_requests_within_the_grace_period_and_exits_0(heads, tmp_path):
    env = {"SALM_TEST_STEP_DELAY": "0.05", "SALM_TEST_NO_EOS": "1"}
    s = Server(tmp_path, heads, "--api_key", KEY, "--shutdown_grace", "6", env=env).ready()
    try:
        short_c, short = _open_stream(s, max_tokens=10)  # ~0.5 s: finishes within the grace period
        long_c, long = _open_stream(s, max_tokens=250)  # > 12 s: cancelled when the grace period ends
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rest = list(short.lines)
        assert "data: [DONE]" in rest
        assert any('"finish_reason": "length"' in line for line in rest)
        assert s.proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 6 + 10
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/health", timeout=2)
        for c, r in ((short_c, short), (long_c, long)):
            r.close()
            c.close()
    finally:
        s.stop()
    assert "Finished server process" in s.log.read_text()


# ---------------------------------------------------------------------- the playground page
CHROMIUM = Path(os.environ.get("SALM_CHROMIUM", "/usr/bin/chromium"))


def test_playground_shows_who_spoke(server, reference, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (dev extra)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SALM_CHROMIUM)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    args += ["--disable-component-update", "--disable-sync", "--no-first-run"]
    want = _gen(reference, "The quick brown fox", max_new_tokens=24)
    want_threshold = _gen(reference, "The quick brown fox", max_new_tokens=24, routing="threshold:0.3")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(server.url + "/")
            page.wait_for_selector("#legend span")
            page.select_option("#mode", "completion")
            page.fill("#prompt", "The quick brown fox")
            page.fill("#max_tokens", "24")
            page.click("#go")
            page.wait_for_selector("#answer[data-done='1']", timeout=30_000)
            tokens = page.eval_on_selector_all(
                "#answer span.tok", "els => els.map(e => [e.dataset.member, getComputedStyle(e).backgroundColor])"
            )
            shares = page.eval_on_selector_all("#shares span.share", "els => els.map(e => e.textContent)")
            title = page.get_attribute("#answer span.tok >> nth=0", "title")
            page.screenshot(path=os.environ.get("SALM_SCREENSHOT", str(tmp_path / "playground.png")))
            assert page.is_disabled("#threshold")  # p only matters for threshold routing
            page.select_option("#routing", "threshold")
            page.fill("#threshold", "0.3")
            page.click("#go")
            page.wait_for_selector("#answer[data-done='1']", timeout=30_000)
            threshold_members = page.eval_on_selector_all("#answer span.tok", "els => els.map(e => e.dataset.member)")
        finally:
            browser.close()
    assert [m for m, _ in tokens] == [d.member for d in want.decisions]
    colours = {}
    for member, bg in tokens:
        assert bg not in ("", "rgba(0, 0, 0, 0)")  # every token is coloured
        assert colours.setdefault(member, bg) == bg  # one colour per member
    assert len(set(colours.values())) == len(colours)
    assert len(colours) >= 2  # the answer really mixes members
    for m in reference.model_ids:
        share = 100 * sum(d.member == m for d in want.decisions) / len(want.decisions)
        shown = [float(s.split()[1].rstrip("%")) for s in shares if s.split()[0] == m]
        assert shown and abs(shown[0] - share) <= 0.5 + 1e-9
    assert all(f"{m}: " in title for m in reference.model_ids)  # routing probabilities on hover
    assert threshold_members == [d.member for d in want_threshold.decisions]  # the page sent threshold:0.3
    assert threshold_members != [d.member for d in want.decisions]  # which routes differently from argmax


def test_serve_help_imports_nothing_heavy():
    code = "from salm.cli import build_parser; build_parser(['serve', '-h']).format_help()"
    assert modules_imported_by(code, ("torch", "transformers", "fastapi", "uvicorn")) == []


def test_engine_keeps_each_rows_history_as_requests_join_and_leave(tiny_infos):
    """The ``aware`` router (training's default) reads each row's record on its own text so far. In the engine
    that record must follow its row through admission into a running batch, and rows leaving: requests of
    different lengths, arriving while others decode, each get exactly what ``generate`` gives them alone."""
    from salm.ensemble import MultiModelWithScalarHeads
    from salm.serve.engine import Engine, SamplingParams

    torch.manual_seed(3)
    ens = MultiModelWithScalarHeads(tiny_infos, device="cpu", router="aware").eval()
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + 3 * i) for i in range(6)]
    want = [_gen(ens, p, max_new_tokens=n).text for p, n in jobs]
    results = FinishedTexts(len(jobs))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(ens, max_batch=4).start()
    try:
        for i, (p, n) in enumerate(jobs):  # later ones join a running batch, the short ones leave it early
            engine.submit(ens.tokenizer(p)["input_ids"], SamplingParams(max_tokens=n, temperature=0.0), results.sink(i))
            if i % 2:
                time.sleep(0.05)
        assert results.wait(60)
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    assert results.texts() == want
