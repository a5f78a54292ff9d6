"""Request parsing: OpenAI messages -> Generator turns, and every 400 names its field."""

from __future__ import annotations

import pytest

from mmjobs.serve.limits import Limits
from mmjobs.serve.protocol import APIError, chunk, completion, parse_chat_request

LIMITS = Limits(default_max_new_tokens=32, max_new_tokens_cap=64, max_images_per_request=2)
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def parse(**body):
    return parse_chat_request({"model": "m", **body}, LIMITS)


def test_image_parts_become_markers_in_order():
    req = parse(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": [{"type": "text", "text": "And this? "}, IMAGE]},
    ])
    assert req.turns == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": "And this? <image>\n"},
    ]
    assert req.image_refs == ["data:image/png;base64,AAAA"] * 2
    assert req.max_new_tokens == 32 and not req.stream and req.temperature == 1.0


def test_settings_and_aliases():
    req = parse(messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "q"}],
                max_completion_tokens=5, max_tokens=60, temperature=0, top_p=0.5,
                stop="\n", seed=3, stream=True, stream_options={"include_usage": True},
                frequency_penalty=0.1, user="someone")  # ignored like other servers do
    assert req.turns[0]["role"] == "system"
    assert (req.max_new_tokens, req.temperature, req.top_p, req.stop, req.seed) == (
        5, 0.0, 0.5, ("\n",), 3)
    assert req.stream and req.include_usage and not req.do_sample


def test_consecutive_user_messages_are_joined():
    req = parse(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert req.turns == [{"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"messages": [{"role": "user", "content": "q"}], "model": ""}, "model", "`model` is required"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages", "last message must come from the user"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]",
     "type 'audio'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", "data: URL or an http(s) URL"),
    ({"messages": [{"role": "user", "content": [IMAGE, IMAGE, IMAGE]}]},
     "messages[0].content[2]", "at most 2"),
    ({"messages": [{"role": "assistant", "content": [IMAGE]}, {"role": "user", "content": "q"}]},
     "messages[0].content[0]", "user messages only"),
    ({"messages": [{"role": "user", "content": "see <image> here"}]}, "messages[0]",
     "may not contain '<image>'"),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 65}, "max_tokens",
     "1 to 64"),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": "5"}, "max_tokens",
     "must be an integer"),
    ({"messages": [{"role": "user", "content": "q"}], "temperature": 3}, "temperature",
     "[0.0, 2.0]"),
    ({"messages": [{"role": "user", "content": "q"}], "n": 2}, "n", "n must be 1"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": ["a"] * 5}, "stop", "at most 4"),
    ({"messages": [{"role": "user", "content": "q"}], "stream": "yes"}, "stream", "true or false"),
    ({"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]}, "tools",
     "tool calling"),
    ({"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_object"}},
     "response_format", "only"),
])
def test_bad_requests_name_the_field(body, param, fragment):
    with pytest.raises(APIError) as err:
        parse_chat_request({"model": "m", **body}, LIMITS)
    assert err.value.status == 400
    assert err.value.param == param
    assert fragment in err.value.message
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_non_object_body():
    with pytest.raises(APIError, match="must be a JSON object, got list"):
        parse_chat_request([1, 2], LIMITS)


def test_response_shapes_follow_openai():
    body = completion("chatcmpl-1", "m", "hi", "stop", 10, 2)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    part = chunk("chatcmpl-1", "m", 5, delta={"content": "h"})
    assert part["object"] == "chat.completion.chunk"
    assert part["choices"][0]["delta"] == {"content": "h"}
    assert part["choices"][0]["finish_reason"] is None
    final = chunk("chatcmpl-1", "m", 5, usage_={"prompt_tokens": 1})
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 1}
