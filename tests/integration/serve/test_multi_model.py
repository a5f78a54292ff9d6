"""One server, several named models (the settings of a sweep): two LaVIN settings built from the
Meta-format LLaMA and CLIP replicas, and the tiny LLaVA, behind one `create_app`.

- `GET /v1/models` lists every model; a chat request with an image goes to the model its
  `model` field names (each answers as itself: the two LaVIN settings differ in their
  adapters, so their answers do too), streaming included;
- an unknown model is a 404 naming the served ones;
- the chat page has a selector whose options are the served settings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmjobs.serve.app import ServeOptions, create_app
from mmjobs.serve.limits import Limits
from mmjobs.serve.server import ServerThread
from tests.integration.serve.client import Client, chart_png, chat_body

pytestmark = pytest.mark.integration
SETTINGS = ("baseline", "dec-dropout")


@pytest.fixture(scope="module")
def second_setting(lavin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LaVIN replica with other MMA adapter weights: a second "setting" of the sweep
    (LaVIN zero-initialises the adapters' up projections, so training is what sets them)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("lavin-setting-b") / "model"
    shutil.copytree(lavin_model_dir, out)
    generator = torch.Generator().manual_seed(7)
    for weights in sorted(out.glob("*.safetensors")):
        tensors = load_file(weights)
        changed = {k: (torch.randn(v.shape, generator=generator) * 0.5).to(v.dtype)
                   if "adapter" in k and v.is_floating_point() else v
                   for k, v in tensors.items()}
        assert any(not torch.equal(changed[k], tensors[k]) for k in tensors), weights
        save_file(changed, weights, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def multi_server(lavin_model_dir: Path, second_setting: Path, tiny_llava_dir: Path):
    from mmjobs.eval.generate import load_for_inference

    loaders = {SETTINGS[0]: lambda: load_for_inference(str(lavin_model_dir), device="cpu"),
               SETTINGS[1]: lambda: load_for_inference(str(second_setting), device="cpu"),
               "tiny-llava": lambda: load_for_inference(str(tiny_llava_dir), device="cpu")}
    app = create_app(loaders, ServeOptions(SETTINGS[0], Limits(default_max_new_tokens=6)))
    server = ServerThread(app).start()
    client = Client(server.url)
    try:
        client.wait_ready(180)
        yield server, client
    finally:
        client.close()
        server.stop()


def test_models_are_listed_and_each_answers_an_image_question_as_itself(multi_server):
    _, client = multi_server
    listed = client.request("GET", "/v1/models")
    assert listed.status == 200
    cards = listed.json()["data"]
    assert [c["id"] for c in cards] == [*SETTINGS, "tiny-llava"]
    assert all(c["loaded"] and c["max_model_len"] > 0 for c in cards)

    answers = {}
    for name in (*SETTINGS, "tiny-llava"):
        reply = client.chat(chat_body(name, "Which color is the bar?", image=chart_png(1),
                                      temperature=0))
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["model"] == name
        assert 1 <= body["usage"]["completion_tokens"] <= 6
        answers[name] = (body["choices"][0]["message"]["content"],
                         body["usage"]["prompt_tokens"])
    # The two settings share LaVIN's prompt layout (same prompt tokens) but not their adapters.
    assert answers[SETTINGS[0]][1] == answers[SETTINGS[1]][1]
    assert answers[SETTINGS[0]][0] != answers[SETTINGS[1]][0], answers
    # Streaming goes to the named model too, and says the same as the non-streamed answer.
    reply, events = client.stream(chat_body(SETTINGS[1], "Which color is the bar?",
                                            image=chart_png(1), temperature=0))
    assert reply.status == 200 and events[-1] == "[DONE]"
    assert {e["model"] for e in events[:-1]} == {SETTINGS[1]}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if e.get("choices"))
    assert text == answers[SETTINGS[1]][0]


def test_an_unknown_model_is_a_404_naming_the_served_ones(multi_server):
    _, client = multi_server
    reply = client.chat(chat_body("inc-dropout", "Hi"))
    assert reply.status == 404
    error = reply.error
    assert error["code"] == "model_not_found" and error["param"] == "model"
    for name in (*SETTINGS, "tiny-llava"):
        assert repr(name) in error["message"]
    assert client.request("GET", "/v1/models/inc-dropout").status == 404
    assert client.request("GET", f"/v1/models/{SETTINGS[1]}").json()["id"] == SETTINGS[1]


def test_the_chat_page_selects_among_the_settings(multi_server):
    _, client = multi_server
    page = client.request("GET", "/")
    assert page.status == 200
    html = page.body.decode()
    assert '<select id="model">' in html
    for name in (*SETTINGS, "tiny-llava"):
        assert f'<option value="{name}">{name}</option>' in html
    assert 'id="model-row" hidden' not in html


def test_the_page_sends_the_question_to_the_selected_setting(multi_server, tmp_path):
    from tests.integration.serve.cdp import Chromium, chromium_path

    if chromium_path() is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium fonts-nanum)")
    server, _ = multi_server
    question = "Which color is the bar?"
    image = tmp_path / "chart.png"
    image.write_bytes(chart_png(1))
    with Chromium.launch(tmp_path / "profile") as browser:
        browser.navigate(server.url + "/")
        browser.wait_for("document.body.dataset.state === 'idle'")
        browser.evaluate("localStorage.clear()")
        assert browser.evaluate("document.getElementById('model').value") == SETTINGS[0]
        browser.evaluate(f"const s = document.getElementById('model'); s.value = "
                         f"'{SETTINGS[1]}'; s.dispatchEvent(new Event('change'))")
        assert browser.evaluate("document.querySelector('h1').textContent") == (
            f"Chat with {SETTINGS[1]}")
        browser.set_files("#image-file", [image])
        browser.wait_for("!document.getElementById('image-preview').hidden")
        browser.evaluate(f"document.getElementById('question').value = '{question}'")
        browser.evaluate("document.getElementById('send').click()")
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state", timeout=120)
        assert state == "done", browser.evaluate("document.getElementById('error').textContent")
        answer = browser.evaluate(
            "[...document.querySelectorAll('.msg.assistant .text')].pop().textContent")
        tag = browser.evaluate(
            "[...document.querySelectorAll('.msg.assistant .model-tag')].pop().textContent")
        answered_by = browser.evaluate(  # the `model` of the server's streamed chunks
            "[...document.querySelectorAll('.msg.assistant')].pop().dataset.model")
    assert tag == f" · {SETTINGS[1]}" and answer  # the page samples (OpenAI's default)
    assert answered_by == SETTINGS[1]
