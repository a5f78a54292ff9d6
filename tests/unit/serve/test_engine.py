"""Streaming and batched generation on the tiny LLaVA: deltas add up to the batched answer."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from mmjobs.eval.generate import PromptInput, load_for_inference, trim_at_stop
from mmjobs.serve.engine import DeltaFilter, RowStops, ServeGenerator, Settings


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


@pytest.mark.slow
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


def test_stop_strings_cut_the_answer_where_a_full_decode_would(loaded):
    full = ServeGenerator(loaded, max_new_tokens=40).run([prompt(1)])[0]
    stop = "26E니"  # in the tiny model's greedy answer to prompt(1), after a few tokens
    assert stop in full.text
    stopped = ServeGenerator(loaded, max_new_tokens=40, stop_strings=[stop]).run([prompt(1)])[0]
    assert stopped.text == trim_at_stop(full.text, [stop]).strip()
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < full.completion_tokens  # generation stopped there


def test_row_stops_match_stop_strings_across_tokens_and_characters(loaded):
    """Fed one token at a time, as generate() does: a stop string split over tokens (and a
    Korean one split inside characters) stops its row at the token that completes it."""
    tokenizer = loaded.processor.tokenizer
    ids = tokenizer.encode("막대 STOP 그래프", add_special_tokens=False)
    prompt_ids = [5, 6, 7]
    for stop in ("STOP", "대 S", "그래", "래프"):
        criterion = RowStops(len(prompt_ids), [threading.Event(), threading.Event()], [stop],
                             tokenizer)
        steps = []
        for n in range(1, len(ids) + 1):
            rows = torch.tensor([prompt_ids + ids[:n], prompt_ids + [ids[0]] * n])
            steps.append(criterion(rows, None).tolist())
        # The first step whose decoded text holds the stop string, and only in its row.
        expected = next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))
        assert [done[0] for done in steps].index(True) + 1 == expected, stop
        assert not any(done[1] for done in steps)


def test_a_cancelled_row_stops_and_its_neighbours_are_unchanged(loaded):
    gen = ServeGenerator(loaded, batch_size=4, max_new_tokens=16)
    prompts = [prompt(k) for k in range(3)]
    expected = gen.run(prompts)
    flags = [threading.Event() for _ in prompts]
    flags[1].set()  # its client left
    results = gen.run(prompts, flags)
    assert results[1].completion_tokens <= 1
    assert [results[0].text, results[2].text] == [expected[0].text, expected[2].text]
