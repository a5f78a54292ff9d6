"""The chat page in headless Chromium: upload an image, ask, see the streamed answer, in en/ko."""

from __future__ import annotations

import json

import pytest

from tests.integration.serve.cdp import Chromium, chromium_path
from tests.integration.serve.client import chart_png

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium not installed (Debian: apt-get install -y chromium fonts-nanum)")

KEY = "page-test-key"


def text(browser: Chromium, selector: str) -> str:
    return browser.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")


def test_chat_page_streams_an_answer(start_server, tmp_path):
    server = start_server(api_key=KEY, default_max_new_tokens=12)
    image = tmp_path / "chart.png"
    image.write_bytes(chart_png(3, size=(120, 90)))
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a picture")

    with Chromium.launch(tmp_path / "profile") as browser:
        browser.navigate(server.url + "/")
        browser.wait_for("document.body.dataset.state === 'idle'")
        browser.evaluate("localStorage.clear()")
        assert text(browser, "h1") == "Chat with tiny-llava"
        assert browser.evaluate("!document.getElementById('auth-row').hidden")

        # A file that is not an image is refused in the page.
        browser.set_files("#image-file", [not_image])
        assert "not an image" in browser.wait_for(
            "!document.getElementById('error').hidden && "
            "document.getElementById('error').textContent")

        # Without the key the server's 401 is shown, and nothing is added to the transcript.
        browser.set_files("#image-file", [image])
        browser.wait_for("!document.getElementById('image-preview').hidden")
        browser.evaluate("document.getElementById('question').value = "
                         "'What is the largest bar?'")
        browser.evaluate("document.getElementById('send').click()")
        browser.wait_for("document.body.dataset.state === 'error'")
        error = text(browser, "#error")
        assert "401" in error and "missing API key" in error
        assert browser.evaluate("document.querySelectorAll('.msg').length") == 0

        # With the key, in Korean: the answer streams into the transcript.
        browser.evaluate("document.getElementById('lang-toggle').click()")
        assert text(browser, "h1") == "tiny-llava와(과) 대화"
        assert text(browser, "#send") == "보내기"
        browser.evaluate(f"document.getElementById('api-key').value = {json.dumps(KEY)}")
        browser.evaluate("document.getElementById('question').value = "
                         "'가장 큰 막대는 무엇입니까?'")
        browser.evaluate("document.getElementById('send').click()")
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state", timeout=120)
        assert state == "done", text(browser, "#error")
        answer = browser.evaluate(
            "[...document.querySelectorAll('.msg.assistant .text')].pop().textContent")
        assert answer and answer != "(빈 답변)", "the tiny model's answer should appear"
        assert browser.evaluate("document.getElementById('error').hidden")
        assert text(browser, ".msg.user .who") == "나"
        assert browser.evaluate("document.querySelectorAll('.msg.user img').length") == 1
        shot = browser.screenshot(tmp_path / "chat-page.png")

    print(f"\nchat page screenshot: {shot}\nanswer: {answer!r}")
    assert shot.stat().st_size > 5000
