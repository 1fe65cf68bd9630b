"""API tests of the chat web server: stream format, nanochat's limits, errors, busy and
disconnect handling, and a bounded loopback load test. All on the tiny random checkpoint."""

import concurrent.futures
import dataclasses
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from sciassist.checkpoints import resolve_model
from sciassist.serve.generation import render_prompt, stream_reply
from sciassist.serve.web.__main__ import _is_loopback, build_parser
from sciassist.serve.web.requests import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TOTAL_CHARS
from sciassist.serve.web.server import BackgroundServer, ServerSettings, create_app
from sciassist.serve.web.state import Gate

QUESTION = {"role": "user", "content": "Why do plants need sunlight?"}


@pytest.fixture(scope="module")
def loaded(tiny_base_dir):
    return resolve_model(source="base", base_dir=tiny_base_dir, finetuned_dir=None, device="cpu")


@pytest.fixture(scope="module")
def app(loaded):
    return create_app(loaded, ServerSettings(max_pending=2, max_tokens=8))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


def parse_events(text):
    """The JSON payloads of an SSE body, checking the framing on the way."""
    blocks = [b for b in text.split("\n\n") if b]
    assert text.endswith("\n\n"), "every event must end with a blank line"
    events = []
    for block in blocks:
        assert block.startswith("data: "), block
        events.append(json.loads(block[len("data: ") :]))
    return events


def post_chat(client, **body):
    body.setdefault("messages", [QUESTION])
    return client.post("/chat/completions", json=body)


class EndlessEngine:
    """Stands in for Engine: one printable token per step, never a stop token, with a
    delay, so tests can watch a long generation get cut short."""

    def __init__(self, model, token, delay_s):
        self.model, self.token, self.delay_s = model, token, delay_s
        self.steps = 0

    def generate(self, tokens, num_samples=1, max_tokens=None, **kwargs):
        for _ in range(max_tokens):
            time.sleep(self.delay_s)
            self.steps += 1
            yield [self.token] * num_samples, [1] * num_samples


class BrokenEngine:
    def __init__(self, model):
        self.model = model

    def generate(self, *args, **kwargs):
        yield [65], [1]
        raise RuntimeError("CUDA error: device-side assert triggered (simulated)")


@pytest.fixture
def swap_engine(app):
    """Replace the app's engine for one test and put the real one back afterwards."""
    state = app.state.chat
    real = state.engine

    def swap(engine):
        state.engine = engine
        return engine

    yield swap
    state.engine = real


# --- the stream ---------------------------------------------------------------------------


def test_stream_format_tokens_then_done(client, loaded):
    response = post_chat(client, temperature=0.0, max_tokens=12)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_events(response.text)
    assert events[-1] == {"done": True}
    tokens = events[:-1]
    assert tokens and all(set(e) == {"token"} and isinstance(e["token"], str) and e["token"] for e in tokens)
    # The server adds the tutor system prompt: the same text as generating directly.
    prompt = render_prompt(loaded.tokenizer, [QUESTION], ServerSettings().system_prompt, loaded.sequence_len, 12)
    from nanochat.engine import Engine

    expected = "".join(
        stream_reply(Engine(loaded.model, loaded.tokenizer), loaded.tokenizer, prompt.ids, 12, 0.0, 50, 1)
    )
    assert "".join(e["token"] for e in tokens) == expected


def test_stream_is_reproducible_with_a_seed(client):
    first = post_chat(client, temperature=1.0, seed=7, max_tokens=10).text
    second = post_chat(client, temperature=1.0, seed=7, max_tokens=10).text
    assert first == second
    assert parse_events(first)[-1] == {"done": True}


def test_no_system_prompt_when_disabled(loaded):
    app = create_app(loaded, ServerSettings(system_prompt=None))
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/health").json()["system_prompt"] is None
        assert parse_events(post_chat(c, temperature=0.0, max_tokens=3).text)[-1] == {"done": True}


def test_multi_turn_history_that_overflows_the_context_gets_a_notice(client, loaded):
    long_turn = "plants need sunlight to make food " * 20  # ~well over a quarter of 256 tokens
    messages = []
    for _ in range(4):
        messages += [{"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn}]
    messages.append(QUESTION)
    events = parse_events(post_chat(client, messages=messages, max_tokens=4).text)
    assert "oldest turn" in events[0]["notice"]
    assert events[-1] == {"done": True}


def test_single_message_longer_than_the_context_is_a_400(client):
    response = post_chat(client, messages=[{"role": "user", "content": "sunlight " * 400}])
    assert response.status_code == 400
    assert "context" in response.json()["error"]


# --- limits -------------------------------------------------------------------------------


def alternating(n, content="hi"):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": content} for i in range(n)]


@pytest.mark.parametrize(
    "body, expected_in_error",
    [
        ({"messages": alternating(MAX_MESSAGES + 2)}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, "messages[0].content"),
        ({"messages": alternating(5, "y" * 7000)}, f"at most {MAX_TOTAL_CHARS}"),
        ({"messages": []}, "messages"),
        ({}, "messages: Field required"),
        ({"messages": [QUESTION], "temperature": -0.1}, "temperature"),
        ({"messages": [QUESTION], "temperature": 2.01}, "temperature"),
        ({"messages": [QUESTION], "temperature": "hot"}, "temperature"),
        ({"messages": [QUESTION], "top_k": 0}, "top_k"),
        ({"messages": [QUESTION], "top_k": 201}, "top_k"),
        ({"messages": [QUESTION], "top_k": 1.5}, "top_k"),
        ({"messages": [QUESTION], "max_tokens": 0}, "max_tokens"),
        ({"messages": [QUESTION], "max_tokens": 4097}, "max_tokens"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [QUESTION, QUESTION]}, "messages[1].role"),
        ({"messages": alternating(2)}, "last message must be from the user"),
        ({"messages": [QUESTION, {"role": "system", "content": "be brief"}, QUESTION]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content: empty"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": ["hello"]}, "messages[0]"),
        ({"messages": "hello"}, "messages"),
        ([QUESTION], "request body: Input should be a valid dictionary"),
        ({"messages": [QUESTION], "temperature": True}, "temperature"),
        ({"messages": [QUESTION], "top_k": "5"}, "top_k"),
        ({"messages": [QUESTION], "max_tokens": 5.5}, "max_tokens"),
        ({"messages": [QUESTION], "seed": -1}, "seed"),
    ],
)
def test_limit_violations_are_422_with_a_json_error(client, body, expected_in_error):
    response = client.post("/chat/completions", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert expected_in_error in error


@pytest.mark.parametrize(
    "raw, expected_in_error",
    [
        # Python's json accepts NaN and 1e400 (inf): the limit check must not let them through.
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', "temperature"),
        # A lone surrogate is valid JSON but not text the tokenizer can encode.
        (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (b"", "request body"),
        (b"null", "request body"),
    ],
)
def test_odd_json_is_rejected_with_a_422(client, raw, expected_in_error):
    response = client.post("/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert expected_in_error in response.json()["error"]


@pytest.mark.parametrize(
    "extra", [{"temperature": 0.0}, {"temperature": 2.0}, {"top_k": 1}, {"top_k": 200}, {"max_tokens": 1}]
)
def test_limit_boundaries_are_accepted(client, extra):
    response = post_chat(client, **extra)
    assert response.status_code == 200
    assert parse_events(response.text)[-1] == {"done": True}


@pytest.mark.parametrize(
    "messages",
    [
        alternating(MAX_MESSAGES - 1, "hi"),  # 499 (odd: it must end with the user)
        # 32,000 characters in total, each message at most 8,000.
        [
            {"role": r, "content": "b" * n}
            for r, n in [("user", 8000), ("assistant", 8000), ("user", 8000), ("assistant", 7999), ("user", 1)]
        ],
    ],
)
def test_requests_exactly_at_the_limits_are_served(client, messages):
    assert len(messages) <= MAX_MESSAGES and sum(len(m["content"]) for m in messages) <= MAX_TOTAL_CHARS
    assert max(len(m["content"]) for m in messages) <= MAX_MESSAGE_CHARS
    response = post_chat(client, messages=messages, max_tokens=1)
    assert response.status_code == 200
    events = parse_events(response.text)
    # Far more than the tiny model's 256-token context: the oldest turns are dropped.
    assert "notice" in events[0] and events[-1] == {"done": True}


def test_malformed_json_is_400(client):
    response = client.post("/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_oversized_body_is_413(client):
    response = client.post("/chat/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


def test_unknown_path_and_method_are_json_errors(client):
    assert client.get("/nope").status_code == 404
    assert "error" in client.get("/nope").json()
    response = client.get("/chat/completions")
    assert response.status_code == 405
    assert "error" in response.json()


# --- busy, failures, disconnects ------------------------------------------------------------


def test_over_the_pending_bound_is_429_quickly(client, app):
    gate = app.state.chat.gate
    tickets = [gate.try_enter() for _ in range(gate.limit)]
    try:
        start = time.monotonic()
        response = post_chat(client)
        assert response.status_code == 429
        assert time.monotonic() - start < 2.0
        assert response.headers["retry-after"] == "1"
        assert "busy" in response.json()["error"]
        assert (
            client.post("/choice", json={"messages": [{"role": "user", "content": "Q\nA. x\nB. y"}]}).status_code == 429
        )
    finally:
        for ticket in tickets:
            ticket.release()
    assert post_chat(client).status_code == 200
    assert client.get("/health").json()["pending"] == 0


def test_gate_counts_and_releases_once():
    gate = Gate(2)
    a, b = gate.try_enter(), gate.try_enter()
    assert gate.try_enter() is None and gate.count == 2
    a.release()
    a.release()  # idempotent: a double release must not admit extra requests
    assert gate.count == 1
    del b  # a response dropped before it ran still gives its place back
    assert gate.count == 0


def test_generation_error_is_reported_in_stream(client, app, swap_engine):
    swap_engine(BrokenEngine(app.state.chat.loaded.model))
    before = client.get("/health").json()["stats"]["failed"]
    response = post_chat(client)
    assert response.status_code == 200  # headers were sent before the failure
    events = parse_events(response.text)
    assert "simulated" in events[-2]["error"]
    assert events[-1] == {"done": True}
    health = client.get("/health").json()
    assert health["stats"]["failed"] == before + 1 and health["pending"] == 0


def test_client_disconnect_stops_generation(app, loaded, swap_engine):
    token = loaded.tokenizer.encode("a")[0]
    engine = swap_engine(EndlessEngine(loaded.model, token, delay_s=0.02))
    with BackgroundServer(app) as server:
        body = {"messages": [QUESTION], "max_tokens": 200}  # 200 x 20 ms = 4 s if never stopped
        with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=10) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    assert "token" in json.loads(line[6:])
                    break
        # The connection is closed: the worker must notice and free the model.
        deadline = time.monotonic() + 3.0
        health = None
        while time.monotonic() < deadline:
            health = httpx.get(server.url + "/health").json()
            if health["pending"] == 0 and health["stats"]["cancelled"] >= 1:
                break
            time.sleep(0.05)
        assert health["pending"] == 0
        assert health["stats"]["cancelled"] >= 1
        assert engine.steps < 150
        # And the model is usable again straight away.
        assert (
            httpx.post(server.url + "/chat/completions", json={"messages": [QUESTION], "max_tokens": 2}).status_code
            == 200
        )


def test_concurrent_requests_are_served_one_at_a_time(app, loaded, swap_engine):
    """Two streams at once: both complete with whole answers (the model lock serialises
    them), none interleaves or fails."""
    token = loaded.tokenizer.encode("a")[0]
    swap_engine(EndlessEngine(loaded.model, token, delay_s=0.005))
    with BackgroundServer(app) as server:

        def one(_):
            r = httpx.post(
                server.url + "/chat/completions", json={"messages": [QUESTION], "max_tokens": 20}, timeout=20
            )
            return r.status_code, parse_events(r.text)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(one, range(2)))
    for status, events in results:
        assert status == 200
        assert "".join(e.get("token", "") for e in events) == "a" * 20
        assert events[-1] == {"done": True}


# --- health, page, choice --------------------------------------------------------------------


def test_health_reports_model_and_limits(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["ready"] is True
    assert health["model"]["n_layer"] == 2 and health["model"]["sequence_len"] == 256
    assert health["model"]["step"] == 0 and health["model"]["source"] == "base"
    assert health["model"]["name"] == "base d2"
    assert health["limits"]["max_messages"] == 500 and health["limits"]["max_total_chars"] == 32000
    assert health["limits"]["top_k"] == [1, 200] and health["limits"]["max_tokens"] == [1, 4096]
    assert health["system_prompt"].startswith("You are a helpful science tutor")


def test_index_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html = response.text
    assert "/chat/completions" in html and "/choice" in html and 'id="stop"' in html
    # Offline: nothing is loaded from another host.
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_choice_for_a_non_multiple_choice_question(client):
    result = client.post("/choice", json={"messages": [QUESTION]}).json()
    assert result == {"letter": None, "probability": None, "probabilities": {}, "num_choices": 0}


def test_choice_picks_the_likeliest_letter(client):
    question = "Which of these animals is a mammal?\n\nA. shark\nB. dolphin\nC. trout"
    response = client.post("/choice", json={"messages": [{"role": "user", "content": question}]})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["num_choices"] == 3
    probabilities = result["probabilities"]
    assert list(probabilities) == ["A", "B", "C"]
    assert abs(sum(probabilities.values()) - 1.0) < 1e-4
    assert result["letter"] == max(probabilities, key=probabilities.get)
    assert result["probability"] == pytest.approx(probabilities[result["letter"]])


def test_choice_for_a_text_first_model_scores_answer_lines(loaded):
    # a model fine-tuned on "The correct answer is <option> (B)." answers: its meta says so
    from sciassist.eval.scoring import choice_scores, softmax
    text_first = dataclasses.replace(loaded, meta={**loaded.meta, "answer_format": "text_first"})
    question = "Which of these animals is a mammal?\n\nA. shark\nB. dolphin\nC. trout"
    with TestClient(create_app(text_first, ServerSettings(max_tokens=8)), base_url="http://[::1]:8000") as text_client:
        result = text_client.post("/choice", json={"messages": [{"role": "user", "content": question}]}).json()
    system_prompt = ServerSettings().system_prompt
    prompt = [[{"role": "user", "content": f"{system_prompt}\n\n{question}" if system_prompt else question}]]
    expected = softmax(choice_scores(loaded.model, loaded.tokenizer, prompt, [["shark", "dolphin", "trout"]],
                                     answer_format="text_first")[0])
    assert list(result["probabilities"].values()) == pytest.approx(expected, abs=1e-5)


def test_choice_validates_like_chat(client):
    assert client.post("/choice", json={"messages": []}).status_code == 422
    too_long = "sunlight " * 400 + "\nA. yes\nB. no"
    response = client.post("/choice", json={"messages": [{"role": "user", "content": too_long}]})
    assert response.status_code == 400 and "context" in response.json()["error"]


# --- the command line --------------------------------------------------------------------------


def test_server_cli_defaults_to_loopback():
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_pending == 4
    assert args.system_prompt.startswith("You are a helpful science tutor")
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")


def test_server_cli_refuses_out_of_range_defaults(capsys):
    from sciassist.serve.web.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--top_k", "500"])
    assert exc.value.code == 2
    assert "argument --top_k: must be between 1 and 200, got 500" in capsys.readouterr().err
    for flag, value, expected in [("--max_tokens", "5000", "between 1 and 4096"), ("--max_pending", "0", ">= 1"),
                                  ("--temperature", "2.5", "between 0.0 and 2.0"),
                                  ("--port", "70000", "between 1 and 65535")]:
        with pytest.raises(SystemExit):
            main([flag, value])
        assert f"argument {flag}: must be {expected}" in capsys.readouterr().err


def test_an_app_built_in_code_refuses_settings_outside_the_api_limits():
    from sciassist.common import UserError
    from sciassist.serve.web.server import ServerSettings, create_app

    with pytest.raises(UserError, match="--top_k must be between 1 and 200, got 0; --max_pending must be >= 1, got 0"):
        create_app(None, ServerSettings(max_pending=0, top_k=0))


def test_background_server_serves_on_a_free_loopback_port(app):
    with BackgroundServer(app) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=1)


# --- bounded load test on loopback -------------------------------------------------------------


def malformed_request(i):
    kinds = [
        {"content": b'{"messages": [', "headers": {"content-type": "application/json"}},
        {"json": {"messages": [{"role": "assistant", "content": "x"}]}},
        {"json": {"messages": [QUESTION], "temperature": 9}},
        {"json": {"messages": [QUESTION], "top_k": 0}},
        {"json": {"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}},
        {"json": {"messages": "nope"}},
        {"content": b"\xff\xfe garbage", "headers": {"content-type": "application/json"}},
        {"json": {"messages": [QUESTION], "max_tokens": -1}},
        {
            "content": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "headers": {"content-type": "application/json"},
        },
        {"content": b"[" * 20000 + b"]" * 20000, "headers": {"content-type": "application/json"}},
        {"content": b" " * (1 << 21), "headers": {"content-type": "application/json"}},  # 413
        {"json": {"messages": [{"role": "user", "content": "sunlight " * 400}]}},  # over the model's context
    ]
    return kinds[i % len(kinds)]


@pytest.mark.slow
def test_load_200_requests_with_50_malformed_gives_no_5xx(loaded):
    app = create_app(loaded, ServerSettings(max_pending=4, max_tokens=2))
    statuses = []
    lock = threading.Lock()
    with BackgroundServer(app) as server:
        url = server.url + "/chat/completions"
        plan = ["bad" if i % 4 == 0 else "good" for i in range(200)]  # 50 malformed
        assert plan.count("bad") == 50

        def one(i):
            with httpx.Client(timeout=20) as http:
                if plan[i] == "bad":
                    r = http.post(url, **malformed_request(i // 4))  # every kind in turn
                else:
                    r = http.post(url, json={"messages": [QUESTION], "max_tokens": 2, "seed": i})
                    if r.status_code == 200:
                        assert parse_events(r.text)[-1] == {"done": True}
                with lock:
                    statuses.append((plan[i], r.status_code))

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(200)))
        elapsed = time.monotonic() - start
        health = httpx.get(server.url + "/health", timeout=5)
    assert len(statuses) == 200
    assert [s for _, s in statuses if s >= 500] == []
    bad = [s for kind, s in statuses if kind == "bad"]
    assert all(400 <= s < 500 for s in bad) and {400, 413, 422} <= set(bad)
    good = [s for kind, s in statuses if kind == "good"]
    # The model is busy throughout; how much of a burst of 8 clients gets 429 rather than a place
    # in the queue depends on the machine's load (60 to 120 of 150 on 2 busy cores). A third
    # served shows that every request gives its place back.
    assert set(good) <= {200, 429} and good.count(200) >= len(good) // 3, (good.count(200), good.count(429))
    assert health.status_code == 200 and health.json()["pending"] == 0
    assert elapsed < 60


# --- other sites, framing, what /health tells -----------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""])
def test_requests_for_another_host_are_refused(client, host):
    # DNS rebinding: a page on evil.example resolves its own name to 127.0.0.1 and calls us
    for method, path in (("GET", "/health"), ("POST", "/chat/completions"), ("GET", "/")):
        response = client.request(method, path, headers={"host": host}, json={"messages": [QUESTION]})
        assert response.status_code == 421, (method, path, host)
        assert "does not answer for host" in response.json()["error"] and "--allow_host" in response.json()["error"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST"])
def test_loopback_names_are_answered(client, host):
    assert client.get("/health", headers={"host": host}).status_code == 200


def test_more_host_names_by_setting(loaded):
    app = create_app(loaded, ServerSettings(allowed_hosts=["tutor.lan"]))
    with TestClient(app, base_url="http://tutor.lan:8000") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"host": "other.lan"}).status_code == 421
    with TestClient(create_app(loaded, ServerSettings(allowed_hosts=["*"])), base_url="http://any.name") as c:
        assert c.get("/health").status_code == 200
    assert build_parser().parse_args(["--allow_host", "a", "--allow_host", "b"]).allowed_hosts == ["a", "b"]


def test_the_page_refuses_to_be_framed_and_head_is_served(client):
    page = client.get("/")
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    head = client.head("/")
    assert head.status_code == 200 and head.content == b"" and head.headers["x-frame-options"] == "DENY"
    assert client.head("/health").status_code == 200


def test_health_names_the_run_without_its_path(client, loaded):
    model = client.get("/health").json()["model"]
    assert model["checkpoint"] == loaded.choice.checkpoint_dir.name
    assert "/" not in model["checkpoint"] and str(loaded.choice.checkpoint_dir.parent) not in json.dumps(model)


def test_a_tiny_temperature_is_greedy_not_an_error(client):
    greedy = parse_events(post_chat(client, temperature=0.0, max_tokens=6, seed=1).text)
    tiny = post_chat(client, temperature=1e-45, max_tokens=6, seed=1)
    assert tiny.status_code == 200 and parse_events(tiny.text) == greedy
    assert greedy[-1] == {"done": True} and not any("error" in e for e in greedy)


def test_a_leading_system_message_replaces_the_servers_system_prompt(loaded):
    own = {"role": "system", "content": "Answer in one word."}
    app = create_app(loaded, ServerSettings(max_tokens=6))
    state = app.state.chat
    prompt = state.render([own, QUESTION], 6)
    assert prompt.ids == render_prompt(loaded.tokenizer, [QUESTION], own["content"], loaded.sequence_len, 6).ids
    tutor = ServerSettings().system_prompt
    assert state.render([QUESTION], 6).ids == render_prompt(loaded.tokenizer, [QUESTION], tutor, loaded.sequence_len,
                                                            6).ids
    with TestClient(app, base_url="http://127.0.0.1") as c:
        events = parse_events(c.post("/chat/completions", json={"messages": [own, QUESTION], "temperature": 0}).text)
    assert events[-1] == {"done": True}
