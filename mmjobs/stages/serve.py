"""Stage `serve`: an OpenAI-compatible chat API and a chat page for a trained model.

    mmjobs serve s3://runs/x/merge --port 8000
    mmjobs serve s3://models/llava-1.5-7b --adapter s3://runs/x/train --api-key-env MMJOBS_KEY
    python -m mmjobs.stages.serve --set model=DIR --set host=0.0.0.0 --set key_env=KEY

Loads a merged model (or base + LoRA adapter) with `load_for_inference` in the background and
serves until SIGTERM/SIGINT: `POST /v1/chat/completions` (images as `image_url` parts, `stream`),
`GET /v1/models`, the chat page at `/`, `/healthz`, `/readyz`, `/metrics` (see
`mmjobs.serve.app`). OpenAI clients, and `mmjobs.eval.judge.JudgeClient`, point at
`http://HOST:PORT/v1`.

Unlike batch stages this writes no output and opens no MLflow run: a server is not a run, and
its request counts and latencies are at `/metrics` for Prometheus. The result (printed as JSON
when it stops) says where it served and how many requests it answered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field, model_validator

from mmjobs.data.conversation import FORMAT_HELP, ConversationFormatName
from mmjobs.logs import get_logger
from mmjobs.serve.limits import LIMIT_DOCS as _DOC
from mmjobs.serve.limits import ConnectionLimits, Limits
from mmjobs.stages.common import StageConfig, StageResult, stage_cli

STAGE = "serve"
log = get_logger(__name__)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_R, _C = Limits(), ConnectionLimits()  # the defaults


class ServeError(RuntimeError):
    """The server could not serve: its API key variable is empty, or the model failed to load."""


class ServeConfig(StageConfig):
    """Serve a model behind an OpenAI-compatible chat-completions API with a chat page."""

    model: str = Field(description="Model URI: local dir, s3:// committed dir or hub id; the "
                       "base model when `adapter` is set.")
    adapter: str | None = Field(None, description="LoRA adapter dir, or a training output "
                                "holding final/adapter (local or s3://).")
    served_model_name: str | None = Field(
        None, description="The name clients send as `model`. Default: the model URI's last "
        "path component (e.g. `merge` for s3://runs/x/merge).")
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


class ServeResult(StageResult):
    """Where the server ran (`output` is its URL) and what it answered."""

    model_name: str
    requests: int


def default_model_name(model: str) -> str:
    """The last path component of a model URI (`s3://runs/x/merge` -> `merge`)."""
    name = PurePosixPath(model.split("://", 1)[-1].rstrip("/").split("@", 1)[0]).name
    return name or "model"


def main(cfg: ServeConfig) -> ServeResult:
    """Serve until SIGTERM/SIGINT; see the module docstring.

    Raises:
        ServeError: `key_env` names an unset variable, or the model failed to load (the
            server then stops; /readyz said why meanwhile).
    """
    import uvicorn

    from mmjobs.eval.generate import load_for_inference
    from mmjobs.serve.app import ServeOptions, create_app
    from mmjobs.serve.auth import api_key_from_env
    from mmjobs.serve.metrics import ServeMetrics
    from mmjobs.serve.server import uvicorn_config

    try:
        api_key = api_key_from_env(cfg.key_env)  # before loading: a missing key fails fast
    except ValueError as e:
        raise ServeError(str(e)) from None
    if api_key is None and cfg.host not in _LOOPBACK:
        log.warning("serving on %s without an API key: anyone who reaches the port can use "
                    "the model (set key_env)", cfg.host)
    name = cfg.served_model_name or default_model_name(cfg.model)
    fields = cfg.model_dump()
    limits = Limits(**{f.name: fields[f.name] for f in dataclasses.fields(Limits)})
    connections = ConnectionLimits(**{f.name: fields[f.name]
                                      for f in dataclasses.fields(ConnectionLimits)})
    options = ServeOptions(model_name=name, limits=limits, connections=connections,
                           api_key=api_key,
                           max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms)
    failures: list[BaseException] = []
    metrics = ServeMetrics()

    def on_load_failure(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(lambda: load_for_inference(cfg.model, cfg.adapter,
                                                trust_remote_code=cfg.trust_remote_code,
                                                dtype=cfg.dtype,
                                                conversation_format=cfg.conversation_format),
                     options, on_load_failure=on_load_failure, metrics=metrics)
    server = uvicorn.Server(uvicorn_config(app, cfg.host, cfg.port, log_level=cfg.log_level,
                                           connections=connections))
    log.info("serving %s%s as %r on http://%s:%d (chat page at /, API at /v1)", cfg.model,
             f" + adapter {cfg.adapter}" if cfg.adapter else "", name, cfg.host, cfg.port)
    with _signals_end_the_stage():
        server.run()  # blocks; uvicorn turns SIGTERM/SIGINT into a graceful shutdown
    if failures:
        raise ServeError(f"{cfg.model}: the model failed to load: {failures[0]}") from failures[0]
    return ServeResult(output=f"http://{cfg.host}:{cfg.port}", model_name=name,
                       requests=int(metrics.requests.total()))


@contextlib.contextmanager
def _signals_end_the_stage() -> Iterator[None]:
    """Let SIGTERM/SIGINT end `main` normally once uvicorn has shut down gracefully.

    uvicorn re-raises the signal it caught after shutting down; with the default handlers that
    kills the process (exit -15) before the stage prints its result. A stop requested by a
    signal is the normal end of a server, so the handlers here just let `main` return.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are delivered to the main thread only
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cli(argv: list[str] | None = None) -> int:
    """`python -m mmjobs.stages.serve` / `mmjobs stage serve` / `mmjobs serve MODEL_URI`."""
    try:
        return stage_cli(STAGE, ServeConfig, main, argv)
    except ServeError as e:
        print(f"mmjobs serve: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
