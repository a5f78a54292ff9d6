"""Streaming and batched generation on the tiny LLaVA: deltas add up to the batched answer."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from mmjobs.eval.generate import PromptInput, load_for_inference
from mmjobs.serve.engine import DeltaFilter, ServeGenerator, Settings


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    return load_for_inference(str(tiny_llava_dir))


def prompt(k: int) -> PromptInput:
    questions = ["What is the largest bar?", "막대 그래프를 설명하세요.", "Total?"]
    image = Image.new("RGB", (48, 40), ((k * 70) % 256, 120, 30))
    return PromptInput([{"role": "user", "content": f"<image>\n{questions[k % 3]}"}], [image])


def test_delta_filter_holds_back_what_could_still_change():
    deltas = DeltaFilter(stop=["STOP"])
    sent = [deltas.update(text) for text in ("  He", "  Hello wo", "  Hello world ST",
                                             "  Hello world STOP and more")]
    # Held each time: leading spaces, the last 3 characters (a "STOP" could be starting),
    # trailing spaces; nothing from the stop string on.
    assert sent == ["H", "ello", " world", ""]
    assert deltas.finish("Hello world") == ""
    assert deltas.sent == "Hello world"
    half_char = DeltaFilter()
    assert half_char.update("ab\ufffd") == "ab"  # U+FFFD may become a whole character
    assert half_char.update("ab가 ") == "가"
    assert half_char.finish("ab가") == ""


@pytest.mark.parametrize("stop", [(), ("a", "\n")])
def test_stream_matches_batched_answers(loaded, stop):
    settings = Settings.make(12, stop)
    gen = ServeGenerator(loaded, batch_size=4, max_new_tokens=settings.max_new_tokens,
                         stop_strings=settings.stop)
    prompts = [prompt(k) for k in range(2)]
    batched = gen.run(prompts)
    assert [r.text for r in batched] == [gen.run([p])[0].text for p in prompts]
    for p, expected in zip(prompts, batched, strict=True):
        deltas: list[str] = []
        result = gen.stream(p, deltas.append, threading.Event())
        assert "".join(deltas) == result.text == expected.text
        assert (result.prompt_tokens, result.completion_tokens) == (
            expected.prompt_tokens, expected.completion_tokens)
    # 16 image tokens + the templated question.
    assert all(r.prompt_tokens > 16 for r in batched)


def test_cancelled_stream_stops_early(loaded):
    gen = ServeGenerator(loaded, max_new_tokens=40)
    cancelled = threading.Event()
    cancelled.set()
    result = gen.stream(prompt(0), lambda _: None, cancelled)
    assert result.completion_tokens <= 1


def test_settings_normalise_greedy_requests():
    assert Settings.make(8, (), 0.0, 0.3, 7) == Settings.make(8)
    assert Settings.make(8, (), 0.7, 0.9, 7) != Settings.make(8, (), 0.7, 0.9, 8)
