"""Stage `serve`: an OpenAI-compatible chat API and a chat page for a trained model.

    mmjobs serve s3://runs/x/merge --port 8000
    mmjobs serve s3://models/llava-1.5-7b --adapter s3://runs/x/train --api-key-env MMJOBS_KEY
    python -m mmjobs.stages.serve --set model=DIR --set host=0.0.0.0 --set key_env=KEY
    mmjobs serve --model baseline=RUN/merge-baseline --model dec=RUN/merge-dec-dropout
    mmjobs serve --run ~/.mmjobs/store/lavin-sweep/run-1a2b3c    # every swept setting

Loads a merged model (or base + LoRA adapter) with `load_for_inference` in the background and
serves until SIGTERM/SIGINT: `POST /v1/chat/completions` (images as `image_url` parts, `stream`),
`GET /v1/models`, the chat page at `/`, `/healthz`, `/readyz`, `/metrics` (see
`mmjobs.serve.app`). OpenAI clients, and `mmjobs.eval.judge.JudgeClient`, point at
`http://HOST:PORT/v1`.

Several models (`models`, `--model NAME=URI`, or `run`: each committed merge-<setting> of a
finished run) share one server: `GET /v1/models` lists them, requests are routed by `model`, the
chat page selects among them, and `max_loaded_models` bounds how many are in memory at once.

Unlike batch stages this writes no output and opens no MLflow run: a server is not a run, and
its request counts and latencies are at `/metrics` for Prometheus. The result (printed as JSON
when it stops) says where it served and how many requests it answered.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import Field

from mmjobs import signals
from mmjobs.logs import get_logger
from mmjobs.serve.config import ServeConfig, ServedModel, default_model_name
from mmjobs.serve.limits import ConnectionLimits, Limits
from mmjobs.stage_contract import Input, Stage, StageResult

if TYPE_CHECKING:
    from mmjobs.models.builder import LoadedModel

NAME = "serve"
log = get_logger(__name__)
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
__all__ = ["STAGE", "ServeConfig", "ServeError", "ServeResult", "default_model_name", "main",
           "served_models"]


class ServeError(RuntimeError):
    """The server could not serve: its API key variable is empty, or the model failed to load."""


class ServeResult(StageResult):
    """Where the server ran (`output` is its URL) and what it answered."""

    model_name: str  # the default (first) model
    model_names: list[str] = Field(default_factory=list)  # every model it served
    requests: int


def served_models(cfg: ServeConfig) -> list[ServedModel]:
    """The named models `cfg` serves (`model`, `models`, or the committed models of `run`).

    Raises:
        ServeError: `run` has no finished model.
    """
    if cfg.run:
        from mmjobs.serve.runs import RunModelsError, swept_models

        try:
            return swept_models(cfg.run)
        except RunModelsError as e:
            raise ServeError(str(e)) from None
    if cfg.models:
        return list(cfg.models)
    assert cfg.model is not None  # ServeConfig requires one of model, models, run
    return [ServedModel(name=cfg.served_model_name or default_model_name(cfg.model),
                        model=cfg.model, adapter=cfg.adapter)]


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
    models = served_models(cfg)
    name = models[0].name
    fields = cfg.model_dump()
    limits = Limits(**{f.name: fields[f.name] for f in dataclasses.fields(Limits)})
    connections = ConnectionLimits(**{f.name: fields[f.name]
                                      for f in dataclasses.fields(ConnectionLimits)})
    options = ServeOptions(model_name=name, limits=limits, connections=connections,
                           api_key=api_key, max_loaded=cfg.max_loaded_models,
                           max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms)
    failures: list[BaseException] = []
    metrics = ServeMetrics()

    def on_load_failure(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    def loader(entry: ServedModel) -> Callable[[], LoadedModel]:
        return lambda: load_for_inference(entry.model, entry.adapter,
                                          trust_remote_code=cfg.trust_remote_code,
                                          dtype=cfg.dtype,
                                          conversation_format=cfg.conversation_format)

    app = create_app({m.name: loader(m) for m in models}, options,
                     on_load_failure=on_load_failure, metrics=metrics)
    server = uvicorn.Server(uvicorn_config(app, cfg.host, cfg.port, log_level=cfg.log_level,
                                           connections=connections))
    for entry in models:
        log.info("serving %s%s as %r", entry.model,
                 f" + adapter {entry.adapter}" if entry.adapter else "", entry.name)
    log.info("on http://%s:%d (chat page at /, API at /v1)", cfg.host, cfg.port)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal; with
    # the default handlers that would kill the process (exit -15) before the stage prints its
    # result. A stop requested by a signal is the normal end of a server: main returns.
    with signals.stop_signals_return():
        server.run()  # blocks
    if failures:
        raise ServeError(f"the model failed to load: {failures[0]}") from failures[0]
    return ServeResult(output=f"http://{cfg.host}:{cfg.port}", model_name=name,
                       model_names=[m.name for m in models],
                       requests=int(metrics.requests.total()))


# A server: no output and no MLflow run (its request counts and latencies are at /metrics).
STAGE = Stage(name=NAME, config=ServeConfig, result=ServeResult, main=main, image="eval",
              own_output=False, inputs=(Input("model"), Input("adapter", default="")),
              errors=(ServeError,))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
