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

import dataclasses
import sys

from mmjobs import signals
from mmjobs.logs import get_logger
from mmjobs.serve.config import ServeConfig, default_model_name
from mmjobs.serve.limits import ConnectionLimits, Limits
from mmjobs.stage_contract import Input, Stage, StageResult

NAME = "serve"
log = get_logger(__name__)
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
__all__ = ["STAGE", "ServeConfig", "ServeError", "ServeResult", "default_model_name", "main"]


class ServeError(RuntimeError):
    """The server could not serve: its API key variable is empty, or the model failed to load."""


class ServeResult(StageResult):
    """Where the server ran (`output` is its URL) and what it answered."""

    model_name: str
    requests: int


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
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal; with
    # the default handlers that would kill the process (exit -15) before the stage prints its
    # result. A stop requested by a signal is the normal end of a server: main returns.
    with signals.stop_signals_return():
        server.run()  # blocks
    if failures:
        raise ServeError(f"{cfg.model}: the model failed to load: {failures[0]}") from failures[0]
    return ServeResult(output=f"http://{cfg.host}:{cfg.port}", model_name=name,
                       requests=int(metrics.requests.total()))


# A server: no output and no MLflow run (its request counts and latencies are at /metrics).
STAGE = Stage(name=NAME, config=ServeConfig, result=ServeResult, main=main, image="eval",
              own_output=False, inputs=(Input("model"), Input("adapter", default="")),
              errors=(ServeError,))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
