"""Stage `infer` through an OpenAI-compatible server (`endpoint:`), against a real `mmjobs serve`
app on loopback serving the tiny LLaVA: greedy answers equal the in-process ones (images as
data URIs, two-turn prompts), a server killed and restarted mid-run costs retries, not rows, and
the agreement check fails the step, naming the rows, when the server runs a different model."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import torch
from PIL import Image

from mmjobs.eval.endpoint import (
    AgreementError,
    EndpointConfig,
    EndpointError,
    EndpointGenerator,
    messages,
)
from mmjobs.eval.generate import Generator, PromptInput, load_for_inference, load_image
from mmjobs.eval.prompts import dataset_items
from mmjobs.serve.app import ServeOptions, create_app
from mmjobs.serve.limits import Limits
from mmjobs.serve.server import ServerThread
from mmjobs.stages.infer import main
from tests.integration.eval.test_infer_stage import N, config, make_dataset, read_rows
from tests.integration.serve.client import Client
from tests.servers import free_port

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    return load_for_inference(str(tiny_llava_dir))


def serve(loaded, port: int = 0) -> ServerThread:
    app = create_app(lambda: loaded, ServeOptions(MODEL, Limits(), max_batch_size=8,
                                                  batch_wait_ms=5))
    server = ServerThread(app, port=port).start()
    client = Client(server.url)
    client.wait_ready()
    client.close()
    return server


@pytest.fixture
def server(loaded):
    server = serve(loaded)
    yield server
    server.stop()


def endpoint(url: str, **kw) -> dict:
    return {"url": f"{url}/v1", "retries": 8, "backoff_seconds": 0.2, **kw}


def prompts_of(dataset: str) -> list[PromptInput]:
    return [PromptInput(i.prompt, [load_image(u) for u in i.images])
            for i in dataset_items(dataset)]


def test_messages_carry_each_image_where_its_marker_was(tmp_path):
    red = Image.new("RGB", (4, 4), "red")
    (msg,) = messages(PromptInput("<image>\nWhat is the largest value?", [red]))
    assert msg["role"] == "user"
    image, text = msg["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert text == {"type": "text", "text": "What is the largest value?"}
    turns = messages(PromptInput([{"role": "user", "content": "Compare <image>\nwith this"},
                                  {"role": "assistant", "content": "ok"},
                                  {"role": "user", "content": "<image>\nAnd now?"}], [red, red]))
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert [p["type"] for p in turns[0]["content"]] == ["text", "image_url", "text"]
    assert turns[1]["content"] == "ok"


def test_endpoint_answers_equal_the_in_process_ones(tiny_llava_dir, tmp_path, server):
    dataset = make_dataset(tmp_path)
    local = main(config(tiny_llava_dir, dataset, tmp_path / "local"))
    served = main(config(tiny_llava_dir, dataset, tmp_path / "served",
                         endpoint=endpoint(server.url, concurrency=4, agreement_sample=N)))
    local_rows, served_rows = read_rows(local.predictions), read_rows(served.predictions)
    assert [r["prediction"] for r in served_rows] == [r["prediction"] for r in local_rows]
    assert [r["id"] for r in served_rows] == [f"chart-{i}" for i in range(N)]
    assert served.output != local.output  # which server answered is part of the output's key
    summary = json.loads((tmp_path / "served" / "infer.json").read_text())
    assert summary["endpoint"]["agreement"] == {"sample": N, "differ": 0, "rows": []}
    assert summary["new_tokens"] > 0  # from the server's usage


def test_a_killed_server_costs_retries_not_rows(loaded, tmp_path):
    dataset = make_dataset(tmp_path)
    prompts = prompts_of(dataset)
    expected = Generator(loaded, max_new_tokens=6).generate(prompts)
    port = free_port()
    first = serve(loaded, port)
    generator = EndpointGenerator(EndpointConfig(**endpoint(f"http://127.0.0.1:{port}",
                                                            model=MODEL)),
                                  batch_size=2, max_new_tokens=6)
    answers = generator.generate(prompts[:3])
    first.stop()  # killed: its keep-alive connections are gone too
    restarted: list[ServerThread] = []
    threading.Timer(1.0, lambda: restarted.append(serve(loaded, port))).start()
    try:
        answers += generator.generate(prompts[3:])  # refused until the restart, then answered
    finally:
        deadline = time.monotonic() + 30
        while not restarted and time.monotonic() < deadline:
            time.sleep(0.1)
        for s in restarted:
            s.stop()
    assert answers == expected
    assert generator.retried >= 1


def test_a_perturbed_server_fails_the_agreement_check_naming_the_rows(loaded, tiny_llava_dir,
                                                                       tmp_path):
    other = copy.deepcopy(loaded)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in other.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    perturbed = serve(other)
    try:
        dataset = make_dataset(tmp_path)
        with pytest.raises(AgreementError) as e:
            main(config(tiny_llava_dir, dataset, tmp_path / "out",
                        endpoint=endpoint(perturbed.url, agreement_sample=3)))
    finally:
        perturbed.stop()
    message = str(e.value)
    assert "differ from the in-process model's on" in message and "of 3 sampled rows" in message
    assert "chart-0" in message or "chart-1" in message or "chart-2" in message
    assert not (tmp_path / "out" / "predictions.jsonl").exists()  # nothing committed


def test_a_refusal_names_the_prompt_and_is_not_retried(server, tmp_path):
    generator = EndpointGenerator(EndpointConfig(**endpoint(server.url, model="no-such-model")),
                                  max_new_tokens=4)
    with pytest.raises(EndpointError, match=r"prompt 0: .*answered 404"):
        generator.generate([PromptInput("hello")])
    assert generator.retried == 0


@pytest.mark.parametrize(("status", "body", "attempts", "error"), [
    (503, b'{"error": {"message": "overloaded"}}', 3, r"failed 3 times; last: HTTP 503"),
    (200, b"<html>not json</html>", 1, r"answered 200 with invalid JSON"),
])
def test_retries_end_with_one_error_naming_the_last_problem(status, body, attempts, error):
    """Transient statuses are retried `retries` times and then fail naming the last one; a
    200 that is not JSON fails at once."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    config = EndpointConfig(url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", retries=2,
                            backoff_seconds=0.01)
    try:
        with pytest.raises(EndpointError, match=error):
            EndpointGenerator(config)  # asks GET /models for the served model's name
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == ["/v1/models"] * attempts
