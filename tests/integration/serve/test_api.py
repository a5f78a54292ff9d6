"""The API on loopback with the tiny LLaVA: completions, streams, models, probes, metrics, judge."""

from __future__ import annotations

import re
import threading

import pytest

from mmjobs.eval.judge import JudgeClient
from tests.integration.serve.client import Client, chart_png, chat_body
from tests.integration.serve.conftest import MODEL_NAME


def test_completion_with_an_image(client):
    reply = client.chat(chat_body(MODEL_NAME, image=chart_png(1), max_tokens=6, temperature=0))
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 16, "16 image tokens + the question"
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_adds_up_to_the_completion(client):
    body = chat_body(MODEL_NAME, "막대 그래프를 설명하세요.", image=chart_png(2), max_tokens=10,
                     temperature=0)
    expected = client.chat(body).json()
    reply, events = client.stream({**body, "stream_options": {"include_usage": True}})
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected["usage"]


def test_text_only_two_images_and_a_conversation(client):
    assert client.chat(chat_body(MODEL_NAME, "What is 2 + 2?")).status == 200
    two = chat_body(MODEL_NAME, "Compare them.", image=chart_png(3))
    two["messages"][0]["content"].insert(1, two["messages"][0]["content"][0])
    assert client.chat(two).status == 200
    conversation = chat_body(MODEL_NAME, image=chart_png(4))
    conversation["messages"] = [{"role": "system", "content": "Answer briefly."},
                                *conversation["messages"],
                                {"role": "assistant", "content": "The second bar."},
                                {"role": "user", "content": "Why?"}]
    assert client.chat(conversation).status == 200


def test_sampling_with_a_seed_repeats(client):
    body = chat_body(MODEL_NAME, image=chart_png(5), max_tokens=8, temperature=0.9, seed=11)
    first, second = client.chat(body).json(), client.chat(body).json()
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


def test_models_and_probes(client):
    models = client.request("GET", "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert client.request("GET", f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    missing = client.request("GET", "/v1/models/gpt-4o")
    assert missing.status == 404 and missing.error["code"] == "model_not_found"
    assert client.request("GET", "/healthz").json() == {"status": "ok"}
    assert client.request("GET", "/readyz").json() == {"status": "ready", "model": MODEL_NAME}
    page = client.request("GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'nonce-" in page.headers["content-security-policy"]
    assert f'"model": "{MODEL_NAME}"' in page.body.decode()


def test_not_ready_until_loaded(start_server, tiny_llava_loaded):
    release = threading.Event()

    def slow_load():
        release.wait(60)
        return tiny_llava_loaded

    server = start_server(load=slow_load, wait_ready=False)
    client = Client(server.url)
    assert client.request("GET", "/healthz").status == 200  # alive while loading
    assert client.request("GET", "/readyz").json()["status"] == "loading"
    early = client.chat(chat_body(MODEL_NAME))
    assert early.status == 503 and early.error["code"] == "model_loading"
    assert early.headers["retry-after"] == "5"
    release.set()
    client.wait_ready(60)
    assert client.chat(chat_body(MODEL_NAME)).status == 200


def test_load_failure_is_reported(start_server):
    def broken_load():
        raise FileNotFoundError("no model at /nowhere")

    server = start_server(load=broken_load, wait_ready=False)
    client = Client(server.url)
    for _ in range(100):
        ready = client.request("GET", "/readyz").json()
        if ready["status"] != "loading":
            break
    assert ready == {"status": "failed", "error": "FileNotFoundError: no model at /nowhere"}
    reply = client.chat(chat_body(MODEL_NAME))
    assert reply.status == 503 and "no model at /nowhere" in reply.error["message"]


def test_metrics_count_requests_tokens_and_latency(client):
    for _ in range(2):
        client.chat(chat_body(MODEL_NAME, max_tokens=4))
    client.chat(chat_body("unknown"))
    text = client.request("GET", "/metrics").body.decode()

    def value(pattern: str) -> float:
        match = re.search("^" + re.escape(pattern) + r" (\S+)$", text, re.MULTILINE)
        assert match, f"{pattern} missing from:\n{text}"
        return float(match.group(1))

    assert value('mmjobs_serve_requests_total{route="/v1/chat/completions",status="200"}') == 2
    assert value('mmjobs_serve_requests_total{route="/v1/chat/completions",status="404"}') == 1
    assert value('mmjobs_serve_request_duration_seconds_count{route="/v1/chat/completions"}') == 3
    assert 2 <= value("mmjobs_serve_generated_tokens_total") <= 8
    assert value("mmjobs_serve_model_ready") == 1


@pytest.mark.parametrize("with_key", [False, True])
def test_the_judge_client_talks_to_the_server(start_server, monkeypatch, with_key):
    """`mmjobs.eval.judge` can use a served mmjobs model as its judge."""
    if with_key:
        monkeypatch.setenv("SERVE_TEST_KEY", "k-123")
    server = start_server(api_key="k-123" if with_key else None)
    judge = JudgeClient(f"{server.url}/v1", MODEL_NAME, api_key_env="SERVE_TEST_KEY",
                        max_retries=0, max_tokens=8)
    judgment = judge.grade("What is the largest bar?", "The second one.",
                           images=[chart_png(6)])
    # A random tiny model writes no rating: the reply arrived and was parsed as unrateable.
    assert judgment.raw is not None and judgment.error in (None, "no rating [[1-10]] in the reply")
    assert judge.stats["requests"] == 1
