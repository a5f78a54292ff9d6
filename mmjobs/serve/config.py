"""The server's settings: the serve stage's config (`mmjobs serve`), which the deploy stage
checks too before it starts a server on the cluster.

One server may serve several named models (`models`, or `run`: every swept setting of a finished
run, see `mmjobs.serve.runs`); clients pick one with the request's `model` field.

Request and connection limits take their defaults and descriptions from `mmjobs.serve.limits`,
which `mmjobs serve --help` and GET /v1/models show as well.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmjobs.data.conversation import FORMAT_HELP, ConversationFormatName
from mmjobs.serve.limits import LIMIT_DOCS as _DOC
from mmjobs.serve.limits import ConnectionLimits, Limits
from mmjobs.stage_contract import StageConfig

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_R, _C = Limits(), ConnectionLimits()  # the defaults
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}$")


class ServedModel(BaseModel):
    """One named model of a server of several (`models`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_MODEL_NAME.pattern, description="The name clients send as "
                      "`model` (letters, digits, . _ : @ + / -; at most 128 characters).")
    model: str = Field(description="Model URI: local dir, s3:// committed dir or hub id (a "
                       "LaVIN or LLaVA dir, merged; or the base when `adapter` is set).")
    adapter: str | None = Field(None, description="LoRA / LaVIN MMA adapter dir, or a training "
                                "output holding final/adapter.")


class ServeConfig(StageConfig):
    """Serve a model (or several named ones) behind an OpenAI-compatible chat-completions API
    with a chat page."""

    model: str | None = Field(None, description="Model URI: local dir, s3:// committed dir or "
                              "hub id; the base model when `adapter` is set. Or set `models` "
                              "or `run` instead.")
    adapter: str | None = Field(None, description="LoRA adapter dir, or a training output "
                                "holding final/adapter (local or s3://).")
    served_model_name: str | None = Field(
        None, description="The name clients send as `model`. Default: the model URI's last "
        "path component (e.g. `merge` for s3://runs/x/merge).")
    models: list[ServedModel] = Field(
        default_factory=list, description="Several models behind one server, each "
        "{name, model, adapter}: requests pick one by `model`, the chat page has a selector "
        "(the first is its default). `mmjobs serve --model NAME=URI` adds one.")
    run: str | None = Field(None, description="A finished run's folder (local or s3://): "
                            "serve each of its committed merge-<setting> models as <setting> "
                            "(a sweep's settings; `mmjobs chat RECIPE` finds the folder).")
    max_loaded_models: int | None = Field(
        None, ge=1, description="Most models in memory at once when serving several (unset: "
        "all, loaded at startup). The first ones load at startup; asking for another unloads "
        "the least recently used idle one (503 model_loading, with Retry-After, meanwhile).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto: bfloat16 on GPUs that support it, else float32.")
    conversation_format: ConversationFormatName = Field(
        "auto", description="How chats are rendered (as the model was trained): auto/template "
        f"= the model's chat template; built-in formats for models without one: {FORMAT_HELP}.")
    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 in a pod "
                      "(then set key_env, or keep the port cluster-internal).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    max_batch_size: int = Field(8, ge=1, description="Most concurrent requests answered by one "
                                "generate call; higher raises throughput and memory use.")
    batch_wait_ms: float = Field(10.0, ge=0, description="How long a request may wait for "
                                 "others to batch with; adds up to this much latency when idle.")
    # Request and connection limits: defaults and descriptions from mmjobs.serve.limits, which
    # `mmjobs serve --help` and GET /v1/models show too.
    max_queue: int = Field(_R.max_queue, ge=1, description=_DOC["max_queue"])
    default_max_new_tokens: int = Field(_R.default_max_new_tokens, ge=1,
                                        description=_DOC["default_max_new_tokens"])
    max_new_tokens_cap: int = Field(_R.max_new_tokens_cap, ge=1,
                                    description=_DOC["max_new_tokens_cap"])
    max_prompt_tokens: int | None = Field(_R.max_prompt_tokens, ge=1,
                                          description=_DOC["max_prompt_tokens"])
    max_request_bytes: int = Field(_R.max_request_bytes, gt=0,
                                   description=_DOC["max_request_bytes"])
    max_image_bytes: int = Field(_R.max_image_bytes, gt=0, description=_DOC["max_image_bytes"])
    max_image_pixels: int = Field(_R.max_image_pixels, gt=0,
                                  description=_DOC["max_image_pixels"])
    max_request_pixels: int = Field(_R.max_request_pixels, gt=0,
                                    description=_DOC["max_request_pixels"])
    max_images_per_request: int = Field(_R.max_images_per_request, ge=1,
                                        description=_DOC["max_images_per_request"])
    max_stop_strings: int = Field(_R.max_stop_strings, ge=0,
                                  description=_DOC["max_stop_strings"])
    max_stop_chars: int = Field(_R.max_stop_chars, ge=1, description=_DOC["max_stop_chars"])
    allow_image_urls: bool = Field(_R.allow_image_urls, description=_DOC["allow_image_urls"])
    image_fetch_timeout_s: float = Field(_R.image_fetch_timeout_s, gt=0,
                                         description=_DOC["image_fetch_timeout_s"])
    decode_workers: int = Field(_R.decode_workers, ge=1, description=_DOC["decode_workers"])
    body_timeout_s: float = Field(_R.body_timeout_s, gt=0, description=_DOC["body_timeout_s"])
    header_timeout_s: float = Field(_C.header_timeout_s, gt=0,
                                    description=_DOC["header_timeout_s"])
    keep_alive_s: float = Field(_C.keep_alive_s, gt=0, description=_DOC["keep_alive_s"])
    max_header_bytes: int = Field(_C.max_header_bytes, ge=1024,
                                  description=_DOC["max_header_bytes"])
    max_connections: int = Field(_C.max_connections, ge=1, description=_DOC["max_connections"])
    # Named like evaluate's `judge.key_env`: config keys that look like credentials
    # (`api_key...`) are refused by the config loader, and this holds only a variable's name.
    key_env: str | None = Field(None, description="Environment variable holding the API key "
                                "clients must send as a Bearer token (unset: no auth; "
                                "`mmjobs serve --api-key-env`). The key never goes in a config.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="uvicorn's log level (access log at info).")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        problems = []
        sources = [k for k in ("model", "models", "run") if getattr(self, k)]
        if len(sources) != 1:
            problems.append("set one of model (one model), models (several, by name) or run "
                            "(every swept setting of a finished run); got "
                            + (" and ".join(sources) if sources else "none"))
        elif self.models:
            counts = Counter(m.name for m in self.models)
            twice = [name for name, n in counts.items() if n > 1]
            if twice:
                problems.append(f"models: the names {sorted(twice)} appear more than once; "
                                "give each model its own name")
        if (self.adapter or self.served_model_name) and not self.model:
            problems.append("adapter and served_model_name go with model; with models, set "
                            "each entry's name and adapter")
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            problems.append(f"default_max_new_tokens={self.default_max_new_tokens} is above "
                            f"max_new_tokens_cap={self.max_new_tokens_cap}; lower it or raise "
                            "the cap")
        if self.key_env is not None and not _ENV_NAME.match(self.key_env):
            problems.append(f"key_env must name an environment variable (letters, digits, "
                            f"_), got a value of {len(self.key_env)} characters; put the "
                            "key itself in that variable, never in the config")
        if self.max_image_bytes > self.max_request_bytes:
            problems.append(f"max_image_bytes={self.max_image_bytes} is above "
                            f"max_request_bytes={self.max_request_bytes}: such an image could "
                            "never arrive; raise max_request_bytes to at least 4/3 of it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def parse_model_flag(text: str) -> ServedModel:
    """`NAME=URI` or `NAME=URI,adapter=URI` (the `mmjobs serve --model` flag) as a `ServedModel`.

    Raises:
        ValueError: not of that form (the message shows it).
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model {text[:200]!r}: expected NAME=MODEL_URI or "
                         "NAME=MODEL_URI,adapter=ADAPTER_URI")
    model, _, adapter = rest.partition(",adapter=")
    return ServedModel(name=name, model=model, adapter=adapter or None)


def default_model_name(model: str) -> str:
    """The last path component of a model URI (`s3://runs/x/merge` -> `merge`)."""
    name = PurePosixPath(model.split("://", 1)[-1].rstrip("/").split("@", 1)[0]).name
    return name or "model"
