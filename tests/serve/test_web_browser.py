"""The chat page in a real browser: Debian's Chromium, driven headless by Playwright.

Starts the server on a free loopback port with the tiny checkpoint, asks questions the way
a person would (typing, Enter, the Stop and New chat buttons) and checks what the page
shows. Set SCIASSIST_SCREENSHOT=docs/chat-web.png to also save a screenshot of a
conversation (test_screenshot_of_a_conversation), and SCIASSIST_BROWSER_CHECKPOINT=DIR to run
against another checkpoint than the tiny random one (a screenshot of a trained model reads better). Skipped when
/usr/bin/chromium is absent (`apt-get install -y chromium`).
Playwright's own browser download is never used: it cannot work offline.
"""

import os
import re
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # root in a container: Chromium's sandbox cannot start
    "--disable-gpu",
    # The machine has no route out: without these Chromium keeps trying to reach Google.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN_DELAY_S = 0.03  # slow the tiny model down enough to watch text arrive

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")


class SlowEngine:
    """The real engine, with a pause after each token: the tiny model is so fast that the
    whole answer would otherwise arrive before the page could be looked at."""

    def __init__(self, engine, delay_s):
        self.engine, self.model, self.delay_s = engine, engine.model, delay_s

    def generate(self, *args, **kwargs):
        for column in self.engine.generate(*args, **kwargs):
            time.sleep(self.delay_s)
            yield column


@pytest.fixture(scope="module")
def server(tiny_base_dir):
    from sciassist.checkpoints import resolve_model
    from sciassist.serve.web.server import BackgroundServer, ServerSettings, create_app

    other = os.environ.get("SCIASSIST_BROWSER_CHECKPOINT")
    if other:
        loaded = resolve_model(checkpoint=other, device="cpu")
    else:
        loaded = resolve_model(source="base", base_dir=tiny_base_dir, finetuned_dir=None, device="cpu")
    # A fixed seed: the random tiny model then says the same (non-empty) thing every run.
    app = create_app(loaded, ServerSettings(seed=3, max_tokens=40))
    app.state.chat.engine = SlowEngine(app.state.chat.engine, TOKEN_DELAY_S)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    # The page's Content-Security-Policy stays on: wait_for_function gets functions, not
    # strings, which the policy would (rightly) refuse to eval.
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    context.set_default_timeout(10_000)  # fail fast rather than at Playwright's 30 s
    page = context.new_page()
    problems = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('model').textContent.includes('step ')", timeout=10_000)
    page.problems = problems
    yield page
    context.close()


def ask(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_answer(page):
    return page.locator(".msg.assistant").last


def wait_until_idle(page, timeout_ms=20_000):
    page.wait_for_function("() => document.getElementById('stop').hidden", timeout=timeout_ms)


def test_question_streams_an_answer(page):
    ask(page, "Why do plants need sunlight?")
    assert page.locator(".msg.user").last.text_content() == "Why do plants need sunlight?"
    # Text shows up while the answer is still streaming (the Stop button is up).
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return a && a.textContent.length > 0 && !document.getElementById('stop').hidden; }",
        timeout=15_000,
    )
    partial = last_answer(page).text_content()
    wait_until_idle(page)
    final = last_answer(page).text_content()
    assert final.startswith(partial) and len(final) > len(partial)
    assert page.evaluate("history.length") == 2
    assert page.evaluate("history[1].content") == final
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert page.problems == []  # no script errors, no blocked requests


def test_follow_up_question_sends_the_history(page):
    ask(page, "What is 12 + 30?")
    wait_until_idle(page)
    ask(page, "And 7 x 6?")
    wait_until_idle(page)
    roles = page.evaluate("history.map(m => m.role)")
    assert roles == ["user", "assistant", "user", "assistant"]
    assert page.locator(".msg.user").count() == 2


def test_stop_button_aborts_the_answer(page, server):
    page.click("summary")  # open Settings, as a person would
    page.fill("#max-tokens", "200")  # 200 x 30 ms: far longer than the test waits
    ask(page, "Tell me about the solar system.")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.msg.assistant')].pop().textContent.length > 0", timeout=15_000
    )
    page.click("#stop")
    wait_until_idle(page, timeout_ms=5_000)
    assert "stopped" in page.locator(".meta").last.text_content()
    # The server noticed the closed connection and let go of the model.
    deadline = time.monotonic() + 5
    while httpx.get(server.url + "/health").json()["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["pending"] == 0
    # The partial answer stays in the history so the conversation still alternates.
    assert page.evaluate("history.map(m => m.role)") == ["user", "assistant"]


def test_new_chat_forgets_the_conversation(page):
    ask(page, "Hello!")
    wait_until_idle(page)
    page.click("#new-chat")
    assert page.evaluate("history.length") == 0
    assert page.locator(".msg").count() == 0
    assert "New conversation" in page.locator("#log").text_content()


def test_server_errors_are_shown(page, server):
    context = httpx.get(server.url + "/health").json()["model"]["sequence_len"]
    if 9 * (context + 10) > 8000:
        pytest.skip("this model's context is longer than one message may be")
    ask(page, "sunlight " * (context + 10))  # under the 8,000-character limit, over the model's context
    error = page.locator(".error").last
    error.wait_for(timeout=10_000)
    assert "shorten it" in error.text_content()
    assert page.evaluate("history.length") == 0  # the refused question is not kept


def test_multiple_choice_answer_gets_a_badge(page):
    ask(page, "Why do plants need sunlight?")
    wait_until_idle(page)
    ask(page, "Which of these animals is a mammal?\n\nA. shark\nB. dolphin\nC. trout")
    badge = page.locator(".badge").last
    badge.wait_for(timeout=20_000)
    assert re.fullmatch(r"Tutor's pick: [ABC] \u00b7 \d{1,3}%", badge.text_content())
    assert page.locator(".badge").count() == 1  # the first question was not multiple choice


SCREENSHOT_QUESTIONS = (
    "Which of these animals is a mammal?\n\nA. shark\nB. dolphin\nC. trout",
    "Which tense does the sentence use?\nMia will walk to school.\n\nA. past tense\nB. future tense\n"
    "C. present tense",
)


@pytest.mark.skipif(not os.environ.get("SCIASSIST_SCREENSHOT"), reason="set SCIASSIST_SCREENSHOT=PATH to take it")
def test_screenshot_of_a_conversation(page):
    # the README's picture: questions in the form the recipes train on, greedy replies
    page.set_viewport_size({"width": 1000, "height": 760})
    page.click("summary")  # the settings are folded away
    page.fill("#temperature", "0")
    page.click("summary")
    for question in SCREENSHOT_QUESTIONS:
        ask(page, question)
        wait_until_idle(page)
    page.locator(".badge").nth(len(SCREENSHOT_QUESTIONS) - 1).wait_for(timeout=20_000)  # each reply's pick
    path = Path(os.environ["SCIASSIST_SCREENSHOT"])
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_a_health_without_model_info_still_reads_well(browser, server):
    # nanochat's own server answers /health without our model fields
    context = browser.new_context()
    page = context.new_page()
    page.route("**/health", lambda route: route.fulfill(status=200, content_type="application/json",
                                                        body='{"status": "ok"}'))
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('model').textContent !== ''")
    text = page.locator("#model").text_content()
    title = page.locator("#model").get_attribute("title")
    context.close()
    assert text == "model" and "undefined" not in title and title == "No system prompt"
