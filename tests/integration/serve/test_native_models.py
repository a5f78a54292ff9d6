"""`mmjobs serve` on the models mmjobs implements itself: the XComposer2 replica, converted as
the chartmoe recipe converts its base, answers chat requests with and without an image in
XComposer2's own turn format (no chat template ships with it)."""

from __future__ import annotations

import pytest

from tests.integration.serve.client import Client, chart_png, chat_body
from tests.integration.serve.conftest import MODEL_NAME


@pytest.fixture(scope="module")
def xcomposer2(replica_dir, tmp_path_factory):
    from mmjobs.eval.generate import load_for_inference
    from mmjobs.models.xcomposer2 import convert_xcomposer2

    out = tmp_path_factory.mktemp("xc2-serve") / "native"
    convert_xcomposer2(replica_dir("internlm/internlm-xcomposer2-7b"), out,
                       vision_dir=replica_dir("openai/clip-vit-large-patch14-336"))
    return load_for_inference(str(out))


def _usage_with_and_without_an_image(loaded, start_server) -> tuple[dict, dict]:
    """Chat once with a chart and once without (4 greedy tokens); both must succeed."""
    client = Client(start_server(load=lambda: loaded).url)
    try:
        with_image = client.chat(chat_body(MODEL_NAME, image=chart_png(1), max_tokens=4,
                                           temperature=0))
        text_only = client.chat(chat_body(MODEL_NAME, max_tokens=4, temperature=0))
    finally:
        client.close()
    assert with_image.status == 200, with_image.body
    assert text_only.status == 200, text_only.body
    return with_image.json()["usage"], text_only.json()["usage"]


def test_xcomposer2_answers_with_and_without_an_image(xcomposer2, start_server):
    assert xcomposer2.info["conversation_format"] == "internlm_xcomposer2"
    image_usage, text_usage = _usage_with_and_without_an_image(xcomposer2, start_server)
    # 490 px: 35 x 35 = 1225 image positions stand in for the one <ImageHere> placeholder.
    assert image_usage["prompt_tokens"] - text_usage["prompt_tokens"] >= 1225
    assert 1 <= image_usage["completion_tokens"] <= 4


@pytest.fixture(scope="module")
def chartwiz(replica_dir, tmp_path_factory):
    """ChartWiz's DePlot-LLaVA composed from its replicas, in the format its demo chats in."""
    from mmjobs.eval.generate import load_for_inference
    from mmjobs.models.deplot.compose import save_composed_deplot_llava

    out = tmp_path_factory.mktemp("chartwiz-serve") / "deplot"
    save_composed_deplot_llava(out, replica_dir("ybelkada/pix2struct-base"),
                               replica_dir("maywell/Synatra-7B-v0.3-dpo"), max_patches=64)
    return load_for_inference(str(out), conversation_format="vicuna_v1")


def test_chartwiz_chat_page_model_answers_a_chart_in_vicuna_v1(chartwiz, start_server):
    """ChartWiz's streamlit demo (st_beta.py: conv v1, a chart and a question) as mmjobs
    serve: vicuna_v1's "</s>" stop string must not make generation fail."""
    image_usage, text_usage = _usage_with_and_without_an_image(chartwiz, start_server)
    # 64 Pix2Struct patches stand in for the one <image>.
    assert image_usage["prompt_tokens"] - text_usage["prompt_tokens"] >= 64
    assert 1 <= image_usage["completion_tokens"] <= 4
