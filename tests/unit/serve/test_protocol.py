"""Request parsing: OpenAI messages -> Generator turns, and every 400 names its field."""

from __future__ import annotations

import pytest

from mmjobs.serve.limits import Limits
from mmjobs.serve.protocol import APIError, chunk, completion, load_json, parse_chat_request

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
    ({"messages": [{"role": "user", "content": "q"}], "seed": 2**64}, "seed", "[-9223372036"),
    ({"messages": [{"role": "user", "content": "q"}], "seed": -2**63 - 1}, "seed", "out of range"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": "x" * 129}, "stop",
     "stop[0] is 129 characters; this server takes at most 128"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": {"a": 1}}, "stop",
     "a string or a list"),
    ({"messages": [{"role": "user", "content": "q \ud800"}]}, "messages[0]", "lone UTF-16"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": ["\udfff"]}, "stop[0]",
     "lone UTF-16"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,\ud800"}}]}]}, "messages[0].content[0].image_url.url",
     "lone UTF-16"),
    ({"messages": [{"role": ["user"], "content": "q"}]}, "messages[0].role", "['user']"),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": [[[[[[1]]]]]]},
     "max_tokens", "got [[[[...]]]]"),
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


def test_a_lone_surrogate_in_the_model_name_is_refused():
    with pytest.raises(APIError, match="lone UTF-16 surrogate") as err:
        parse_chat_request({"model": "m\ud83d", "messages": [{"role": "user", "content": "q"}]},
                           LIMITS)
    assert err.value.param == "model"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"{", b"\xff",
                                  b'{"n": ' + b"9" * 5000 + b"}"])
def test_json_that_cannot_be_parsed_is_400(body):
    with pytest.raises(APIError) as err:
        load_json(body)
    assert err.value.status == 400 and err.value.code == "invalid_json"
    assert len(err.value.message) < 400


ODD_VALUES = [None, True, 0, -1, 1.5, 1e308, float("nan"), 2**70, "", "x" * 10_000, "\ud800",
              [], [1], [[[[[]]]]], {}, {"a": [1]}]


@pytest.mark.parametrize("field", ["model", "messages", "max_tokens", "max_completion_tokens",
                                   "temperature", "top_p", "stop", "seed", "stream",
                                   "stream_options", "n", "response_format", "tools"])
def test_any_json_value_in_any_field_is_accepted_or_a_400(field):
    """Nothing a client can put in a field makes parsing raise anything but a 400."""
    base = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    for value in ODD_VALUES:
        for body in ({**base, field: value},
                     {**base, "messages": [{"role": "user", field: value, "content": value}]},
                     {**base, "messages": [{"role": value, "content": [
                         {"type": "text", "text": value}, {"type": "image_url",
                                                          "image_url": {"url": value}}]}]}):
            try:
                parse_chat_request(body, LIMITS)
            except APIError as e:
                assert e.status == 400 and len(e.message) < 600, (field, value, e.message)
