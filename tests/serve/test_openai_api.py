"""The OpenAI-compatible API (sciassist.serve.web.openai_api), driven by the official `openai`
client against the server on a loopback port, and its request rules."""

import json

import pytest
from fastapi.testclient import TestClient

from nanochat.engine import Engine
from sciassist.checkpoints import resolve_model
from sciassist.serve.generation import render_prompt, stream_reply
from sciassist.serve.web.openai_api import StopText
from sciassist.serve.web.server import BackgroundServer, ServerSettings, create_app

openai = pytest.importorskip("openai")

QUESTION = {"role": "user", "content": "Why do plants need sunlight?"}
TUTOR = ServerSettings().system_prompt


@pytest.fixture(scope="module")
def loaded(tiny_base_dir):
    return resolve_model(source="base", base_dir=tiny_base_dir, finetuned_dir=None, device="cpu")


@pytest.fixture(scope="module")
def app(loaded):
    return create_app(loaded, ServerSettings(max_tokens=10))


@pytest.fixture(scope="module")
def server(app):
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(loaded, messages, system_prompt, max_tokens):
    prompt = render_prompt(loaded.tokenizer, messages, system_prompt, loaded.sequence_len, max_tokens)
    engine = Engine(loaded.model, loaded.tokenizer)
    return "".join(stream_reply(engine, loaded.tokenizer, prompt.ids, prompt.max_new_tokens, 0.0, None)), prompt


def test_models_lists_the_served_model(client, loaded):
    assert [m.id for m in client.models.list().data] == [loaded.choice.name]


def test_a_completion_equals_the_engines_greedy_reply(client, loaded):
    expected, prompt = greedy_text(loaded, [QUESTION], TUTOR, 8)
    reply = client.chat.completions.create(model="anything", messages=[QUESTION], temperature=0, max_tokens=8)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert reply.model == loaded.choice.name and reply.object == "chat.completion"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(prompt.ids)
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_text_in_chunks(client, loaded):
    system = {"role": "system", "content": "Answer briefly."}
    expected, _ = greedy_text(loaded, [QUESTION], system["content"], 8)
    stream = client.chat.completions.create(model="m", messages=[system, QUESTION], temperature=0, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_sequences_end_the_reply_before_them(client, loaded):
    full, _ = greedy_text(loaded, [QUESTION], TUTOR, 10)
    assert len(full) >= 4, full
    stop = full[2:4]  # a piece of what the model says anyway
    reply = client.chat.completions.create(model="m", messages=[QUESTION], temperature=0, max_tokens=10, stop=[stop])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="m", messages=[QUESTION], temperature=0, max_tokens=10,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.find(stop)]


def test_stop_text_holds_back_only_what_could_start_a_stop_sequence():
    stopper = StopText(["END", "\n\n"])
    assert [stopper.feed(p) for p in ("abc", "E", "N", "x", "\n")] == ["abc", "", "", "ENx", ""]
    assert stopper.feed("\nrest") == "" and stopper.hit  # "\n\n": stop, nothing after it
    plain = StopText([])
    assert plain.feed("any") == "any" and plain.flush() == "" and not plain.hit
    tail = StopText(["END"])
    assert tail.feed("the EN") == "the " and tail.flush() == "EN"


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "messages[0].role"),
    ({"messages": [QUESTION], "temperature": 3}, 422, "temperature"),
    ({"messages": [QUESTION], "n": 2}, 422, "n"),
    ({"messages": [QUESTION], "top_p": 0.5}, 422, "top_p below 1 is not supported"),
    ({"messages": [QUESTION], "presence_penalty": 1.0}, 422, "presence_penalty is not supported"),
    ({"messages": [QUESTION], "stop": ["a", "b", "c", "d", "e"]}, 422, "stop takes at most 4"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, 422, "at most 8000 allowed"),
    ({"messages": [{"role": "user", "content": "sunlight " * 400}]}, 400, "context"),
])
def test_bad_requests_get_openai_shaped_errors(app, body, status, needle):
    with TestClient(app, base_url="http://127.0.0.1") as c:
        response = c.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_the_official_client_raises_on_an_error(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="m", messages=[QUESTION], top_p=0.3)
    assert "top_p below 1" in json.dumps(info.value.body)


def test_content_parts_and_the_developer_role_are_read(app, loaded):
    expected, _ = greedy_text(loaded, [QUESTION], "Be brief.", 6)
    body = {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Why do plants "},
                                                      {"type": "text", "text": "need sunlight?"}]}],
            "temperature": 0, "max_completion_tokens": 6}
    with TestClient(app, base_url="http://127.0.0.1") as c:
        reply = c.post("/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"] == expected
