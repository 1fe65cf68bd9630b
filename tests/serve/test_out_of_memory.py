"""A reply too large for the card (tests/simulated_card.py), in the terminal chat, the web server and
the OpenAI-compatible API: one message, the memory released, and the next request served."""

import json

import pytest
from fastapi.testclient import TestClient

from sciassist.checkpoints import resolve_model
from sciassist.serve.chat_cli import ChatSession, ChatSettings, run_interactive, run_once
from sciassist.serve.web.server import ServerSettings, create_app
from tests.simulated_card import GB, AllocationHook, simulated_card

SHORT = {"role": "user", "content": "Why?"}
LONG = {"role": "user", "content": "plants need sunlight to make food " * 12}  # ~4x the prompt of SHORT
CARD = "Simulated GPU (16.0 GB, 15.0 GB free)"


@pytest.fixture(scope="module")
def loaded(tiny_base_dir):
    return resolve_model(source="base", base_dir=tiny_base_dir, finetuned_dir=None, device="cpu")


# --- the terminal chat ----------------------------------------------------------------------


def chat_peak(session, monkeypatch, question):
    """The most bytes one reply to `question` holds on an unlimited card."""
    with simulated_card(monkeypatch, total=16 * GB) as card:
        reply = "".join(session.ask(question))
    session.clear()
    return card.peak, reply


def test_chat_reply_out_of_memory_is_one_line_and_the_conversation_goes_on(loaded, monkeypatch, capsys, one_thread):
    session = ChatSession(loaded, ChatSettings(temperature=0.0, max_tokens=8))
    short_peak, short_reply = chat_peak(session, monkeypatch, SHORT["content"])
    long_peak, _ = chat_peak(session, monkeypatch, LONG["content"])
    assert short_peak < long_peak and short_reply
    lines = iter([LONG["content"], SHORT["content"], "/quit"])
    with simulated_card(monkeypatch, total=16 * GB, free=15 * GB, budget=(short_peak + long_peak) // 2) as card:
        assert run_interactive(session, input_fn=lambda prompt: next(lines)) == 0
    out, err = capsys.readouterr()
    assert card.failures == 1  # the long reply, once; the short one fitted
    [message] = [line for line in err.splitlines() if line.startswith("[error:")]
    assert message.startswith(f"[error: out of memory on {CARD} while generating this reply (CUDA out of memory.")
    assert message.endswith("try /clear to start over with a shorter conversation, a smaller --max_tokens, or "
                            "--device cpu]")
    assert "Traceback" not in err
    assert out == f"Tutor: \nTutor: {short_reply}\n"  # the next turn is answered as without the card
    # the failed turn is forgotten: the next prompt does not carry it
    assert session.messages == [SHORT, {"role": "assistant", "content": short_reply}]

    session.clear()
    with simulated_card(monkeypatch, total=16 * GB, free=15 * GB, budget=(short_peak + long_peak) // 2):
        assert run_once(session, LONG["content"]) == 2  # -p: one error line, exit code 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: out of memory on {CARD}") and err.count("\n") == 1
    assert session.messages == []


# --- the web server and the OpenAI-compatible API -------------------------------------------


class OnTheCard:
    """The app's engine with the allocations of its generation counted by `hook`, in the worker
    thread that generates (a dispatch mode holds for its own thread only). full_after: after
    that many tokens nothing more fits (a reply that runs out of memory mid-stream)."""

    def __init__(self, engine, hook, full_after=None):
        self.engine, self.hook, self.full_after = engine, hook, full_after
        self.model = engine.model

    def generate(self, *args, **kwargs):
        with self.hook:
            for step, column in enumerate(self.engine.generate(*args, **kwargs), start=1):
                yield column
                if step == self.full_after:
                    self.hook.budget = self.hook.current


@pytest.fixture
def web(loaded, monkeypatch):
    """(TestClient, app state, the real engine) of a server on a simulated card."""
    app = create_app(loaded, ServerSettings(max_tokens=8, temperature=0.0))
    with simulated_card(monkeypatch, total=16 * GB, free=15 * GB), \
            TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client, app.state.chat, app.state.chat.engine


def parse_events(text):
    return [json.loads(block[len("data: "):]) for block in text.split("\n\n") if block and block != "data: [DONE]"]


def following_events(text):
    """The events of a stream without what differs from reply to reply (OpenAI's id and time)."""
    events = [{k: v for k, v in e.items() if k not in ("id", "created")} for e in parse_events(text)]
    assert events and any(e.get("token") or e.get("choices", [{}])[0].get("delta", {}).get("content")
                          for e in events)
    return events


def web_budget(client, state, engine):
    """A budget between the peaks of a SHORT and a LONG reply (measured on an unlimited card)."""
    peaks = []
    for question in (SHORT, LONG):
        state.engine = OnTheCard(engine, AllocationHook(None))
        assert client.post("/chat/completions", json={"messages": [question]}).status_code == 200
        peaks.append(state.engine.hook.peak)
    assert peaks[0] < peaks[1]
    return sum(peaks) // 2


@pytest.mark.parametrize("path, body", [
    ("/chat/completions", {}),
    ("/v1/chat/completions", {}),
    ("/v1/chat/completions", {"stream": True}),
])
def test_a_reply_too_large_for_the_card_is_a_507_and_the_server_goes_on(web, path, body, one_thread):
    client, state, engine = web
    budget = web_budget(client, state, engine)
    expected = client.post(path, json={"messages": [SHORT], **body}).text  # as served without the card
    hook = AllocationHook(budget)
    state.engine = OnTheCard(engine, hook)
    response = client.post(path, json={"messages": [LONG], **body})
    assert response.status_code == 507 and response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    if path.startswith("/v1/"):  # OpenAI's error object
        assert (error["type"], error["code"], error["param"]) == ("server_error", 507, None)
        error = error["message"]
    assert error.startswith(f"out of memory on {CARD} while generating this reply (CUDA out of memory.")
    assert error.endswith("retry with a smaller max_tokens or a shorter conversation")
    assert hook.failures == 1 and hook.current == 0  # what the reply held is released
    following = client.post(path, json={"messages": [SHORT], **body})
    assert following.status_code == 200
    if path.startswith("/v1/") and not body:
        assert following.json()["choices"] == json.loads(expected)["choices"]
    else:
        assert following_events(following.text) == following_events(expected)
    health = client.get("/health").json()
    assert health["stats"]["out_of_memory"] == 1 and health["stats"]["failed"] == 0 and health["pending"] == 0


def test_out_of_memory_mid_stream_ends_the_stream_with_an_error_event(web, one_thread):
    client, state, engine = web
    state.engine = OnTheCard(engine, AllocationHook(None), full_after=3)
    response = client.post("/chat/completions", json={"messages": [SHORT]})
    assert response.status_code == 200  # the first tokens had gone out
    events = parse_events(response.text)
    assert events[0].keys() == {"token"} and events[-1] == {"done": True}
    assert events[-2]["error"].startswith(f"out of memory on {CARD} while generating this reply")

    state.engine = OnTheCard(engine, AllocationHook(None), full_after=3)
    response = client.post("/v1/chat/completions", json={"messages": [SHORT], "stream": True})
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    events = parse_events(response.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    [error] = [e["error"] for e in events if "error" in e]
    assert (error["type"], error["code"]) == ("server_error", 507) and error["message"].startswith("out of memory")

    state.engine = engine
    assert parse_events(client.post("/chat/completions", json={"messages": [SHORT]}).text)[-1] == {"done": True}
    assert client.get("/health").json()["stats"]["out_of_memory"] == 2


def test_the_openai_client_gets_the_507_once_without_retrying(web, one_thread):
    openai = pytest.importorskip("openai")
    client, state, engine = web
    hook = AllocationHook(web_budget(client, state, engine))
    state.engine = OnTheCard(engine, hook)
    api = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="unused", max_retries=2, http_client=client)
    with pytest.raises(openai.APIStatusError) as info:
        api.chat.completions.create(model="m", messages=[LONG])
    assert info.value.status_code == 507 and "out of memory" in info.value.message
    assert hook.failures == 1  # x-should-retry: false, so the client asked once
    assert api.chat.completions.create(model="m", messages=[SHORT]).choices[0].message.content


def test_choice_out_of_memory_is_a_507(web, monkeypatch, one_thread):
    client, state, _ = web
    real = state.choice_probabilities

    def on_a_full_card(*args):  # in the worker thread that scores
        with AllocationHook(budget=1000):
            return real(*args)

    monkeypatch.setattr(state, "choice_probabilities", on_a_full_card)
    body = {"messages": [{"role": "user", "content": "Which is a mammal?\nA. whale\nB. trout"}]}
    response = client.post("/choice", json=body)
    assert response.status_code == 507 and response.headers["x-should-retry"] == "false"
    assert response.json()["error"].startswith(f"out of memory on {CARD} scoring this question")
    monkeypatch.setattr(state, "choice_probabilities", real)
    assert client.post("/choice", json=body).json()["letter"] in ("A", "B")
