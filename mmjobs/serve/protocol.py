"""The OpenAI chat-completions wire format: request parsing, responses, stream chunks, errors.

    request = parse_chat_request(json.loads(body), limits)   # or raises APIError (4xx)
    request.turns       # [{"role": "user", "content": "<image>\\nWhat is the largest bar?"}]
    request.image_refs  # ["data:image/png;base64,..."], one per <image> marker, in order

Only what a single-model server can honour is accepted: `n` must be 1, and tools, logprobs and
JSON mode are refused with a 400 naming the field rather than silently ignored. Fields that only
tune behaviour we do not have (`frequency_penalty`, `user`, `metadata`, ...) are ignored, as
other OpenAI-compatible servers do, so stock clients work unchanged.

Whatever a client sends is a 4xx, never a 500: JSON nested too deeply for the parser, integers
out of range, strings holding lone UTF-16 surrogates (valid JSON escapes that no tokenizer or
UTF-8 encoder accepts), wrong types. Values quoted in error messages are shortened
(`reprlib`), so a 10 MB field does not come back in the error.
"""

from __future__ import annotations

import json
import reprlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mmjobs.data.records import IMAGE_TOKEN
from mmjobs.serve.limits import Limits

__all__ = ["APIError", "ChatRequest", "chunk", "completion", "error_body", "load_json",
           "parse_chat_request"]

# Roles a chat template knows; "developer" is OpenAI's newer name for "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = {  # field -> why; sent with a non-default value they would be silently wrong
    "tools": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "logprobs": "logprobs are not supported by this server",
    "top_logprobs": "logprobs are not supported by this server",
}
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI documents it; torch takes any of these
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 4, 4
_REPR.maxlong = 40


class APIError(Exception):
    """An error answered as OpenAI-style JSON: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type_: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ChatRequest:
    """A validated chat-completions request.

    Attributes:
        model: the requested model name (checked against the served name by the app).
        turns: `{role, content}` with `<image>` where each image goes (Generator's format).
        image_refs: the image URLs (data: or http(s)), in marker order.
        max_new_tokens, temperature, top_p, stop, seed: generation settings. As in OpenAI's
            API, temperature defaults to 1.0 (sampling); 0 means greedy decoding.
        max_tokens_param: the field that set `max_new_tokens` ("max_tokens" or
            "max_completion_tokens"), or None when it is the server's default (which the app
            may shorten to fit the model's context).
        stream, include_usage: SSE streaming, and a final usage chunk in the stream.
    """

    model: str
    turns: list[dict[str, str]]
    image_refs: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    max_tokens_param: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, param=param, code=code)


def show(value: Any) -> str:
    """A short repr of a client's value for an error message (nesting and length cut)."""
    return _REPR.repr(value)


def load_json(body: bytes) -> Any:
    """The request body parsed as JSON.

    Raises:
        APIError: 400 for malformed JSON, text that is not UTF-8, integers too long to convert
            and nesting deeper than the parser's recursion limit (about 1000 levels).
    """
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply (over about 1000 "
                       "levels of arrays/objects); a chat request needs fewer than 10",
                       code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise APIError(400, f"malformed JSON in the request body: {str(e)[:200]}",
                       code="invalid_json") from None


def _string(value: str, where: str) -> str:
    """`value`, refused if it holds a lone UTF-16 surrogate (JSON allows `\\ud800`; UTF-8,
    tokenizers and responses do not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{where} holds a lone UTF-16 surrogate ({value[e.start]!r} at character "
                   f"{e.start}); send valid Unicode (a JSON \\ud8xx escape must be followed by "
                   "its \\udcxx pair)", where, code="invalid_unicode") from None
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(f"{name} must be a number in [{low}, {high}], got {show(value)}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int,
             allowed: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {show(value)}", name)
    if not low <= value <= high:
        raise _bad(f"{name}={show(value)} is out of range: "
                   f"{allowed or f'it must be in [{low}, {high}]'}", name)
    return value


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body.

    Raises:
        APIError: 400 naming the field and the problem.
    """
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("`model` is required: the served model's name (GET /v1/models lists it)",
                   "model")
    _string(model, "model")
    for name, why in _UNSUPPORTED.items():
        if body.get(name):
            raise _bad(f"{name}: {why}", name, code="unsupported_parameter")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise _bad("response_format: only {\"type\": \"text\"} is supported", "response_format",
                   code="unsupported_parameter")
    if body.get("n", 1) != 1:
        raise _bad(f"n must be 1 (one answer per request), got {show(body.get('n'))}", "n")
    turns, refs = _messages(body.get("messages"), limits)

    cap = limits.max_new_tokens_cap
    allowed = f"this server generates 1 to {cap} tokens per answer (max_new_tokens_cap)"
    param: str | None = "max_completion_tokens"
    max_tokens = _integer(body, "max_completion_tokens", 1, cap, allowed)
    if max_tokens is None:
        param, max_tokens = "max_tokens", _integer(body, "max_tokens", 1, cap, allowed)
    if max_tokens is None:
        param, max_tokens = None, limits.default_max_new_tokens
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {show(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return ChatRequest(
        model=model, turns=turns, image_refs=refs, max_new_tokens=max_tokens,
        max_tokens_param=param, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), stop=_stops(body.get("stop"), limits),
        seed=_integer(body, "seed", *SEED_RANGE), stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _stops(stop: Any, limits: Limits) -> tuple[str, ...]:
    """`stop` (a string or a list of strings) within the count and length limits."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad(f"stop must be a string or a list of strings, got {show(stop)}", "stop")
    if len(stops) > limits.max_stop_strings:
        raise _bad(f"stop has {len(stops)} strings; this server takes at most "
                   f"{limits.max_stop_strings} (max_stop_strings)", "stop", code="stop_too_long")
    for k, s in enumerate(stops):
        if len(s) > limits.max_stop_chars:
            raise _bad(f"stop[{k}] is {len(s):,} characters; this server takes at most "
                       f"{limits.max_stop_chars} per stop string (max_stop_chars)", "stop",
                       code="stop_too_long")
        _string(s, f"stop[{k}]")
    return tuple(s for s in stops if s)


def _messages(messages: Any, limits: Limits) -> tuple[list[dict[str, str]], list[str]]:
    """OpenAI messages -> Generator turns with `<image>` markers, plus the image URLs."""
    if not isinstance(messages, list) or not messages:
        raise _bad("`messages` must be a non-empty list of {role, content} objects", "messages")
    turns: list[dict[str, str]] = []
    refs: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with role and content", where)
        raw_role = message.get("role")
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise _bad(f"{where}.role must be one of {sorted(_ROLES)}, got {show(raw_role)}",
                       f"{where}.role")
        text = _content(message.get("content"), role, where, refs, limits)
        if turns and turns[-1]["role"] == role and role != "system":
            turns[-1]["content"] += "\n" + text  # consecutive same-role turns: one turn
        else:
            turns.append({"role": role, "content": text})
    if turns[-1]["role"] != "user":
        raise _bad("the last message must come from the user (the model answers it); got "
                   f"{turns[-1]['role']!r}", "messages")
    return turns, refs


def _content(content: Any, role: str, where: str, refs: list[str], limits: Limits) -> str:
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content parts",
                   f"{where}.content")
    pieces: list[str] = []
    for k, part in enumerate(content):
        at = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(_text(part["text"], at))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise _bad(f"{at}.image_url.url must be a data: URL or an http(s) URL", at)
            _string(url, f"{at}.image_url.url")
            if role != "user":
                raise _bad(f"{at}: images are accepted in user messages only", at)
            if len(refs) >= limits.max_images_per_request:
                raise _bad(f"{at}: too many images; this server takes at most "
                           f"{limits.max_images_per_request} per request", at,
                           code="too_many_images")
            refs.append(url)
            pieces.append(IMAGE_TOKEN + "\n")
        else:
            raise _bad(f"{at} must be {{\"type\": \"text\", \"text\": ...}} or "
                       f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}; got "
                       f"type {show(kind)}", at)
    return "".join(pieces)


def _text(text: str, where: str) -> str:
    _string(text, where)
    # The marker is how images are placed; text holding it would shift every image.
    if IMAGE_TOKEN in text:
        raise _bad(f"{where}: text may not contain {IMAGE_TOKEN!r} (the model's image marker); "
                   "send images as image_url content parts", where)
    return text


# --------------------------------------------------------------------------- responses


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(completion_id: str, model: str, text: str, finish_reason: str,
               prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(completion_id: str, model: str, created: int, *, delta: dict[str, str] | None = None,
          finish_reason: str | None = None, usage_: dict[str, int] | None = None
          ) -> dict[str, Any]:
    """A `chat.completion.chunk`; with `usage_` it is the final usage chunk (no choices)."""
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk",
                            "created": created, "model": model, "system_fingerprint": None}
    if usage_ is not None:
        body["choices"] = []
        body["usage"] = usage_
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None,
                            "finish_reason": finish_reason}]
    return body
