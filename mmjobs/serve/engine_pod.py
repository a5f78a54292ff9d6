"""A serving engine (vLLM, SGLang, TGI, any OpenAI-compatible server image) for a pipeline's
eval steps: the recipe's `eval.engine` section and the engine's Deployment + Service.

The recipe says which image runs and with which command line::

    eval:
      engine:
        image: vllm/vllm-openai:v0.11.0
        args: [--model, "{model}", --served-model-name, "{name}", --port, "{port}",
               --max-model-len, "4096"]
        gpus: 1
        endpoint: {concurrency: 32, agreement_sample: 20}

and the pipeline (`pipelines/engines.py`) starts one engine per evaluated model before its
infer steps, points them at it and deletes it after (`mmjobs.stages.engine`).

The pod: an init container of the eval image copies the model from the store
(`mmjobs store cp <merge dir> /models/model`, S3 credentials from `cluster.secrets.s3`, the
same Secret every step reads) into an emptyDir that the engine reads as a plain Hugging Face
folder (`{model}` in `args` is that path: vLLM's `--model` takes a local dir, so the engine
needs no S3 client or credentials of its own). The engine container runs with the restricted
security context of every mmjobs pod (UID 10001, read-only root filesystem, no capabilities):
the vllm-openai image runs as root by default and writes caches under $HOME (~/.cache/vllm,
~/.triton, ~/.config/vllm), so $HOME, XDG_CACHE_HOME and HF_HOME point into a writable /tmp
emptyDir, /dev/shm is a memory-backed emptyDir (tensor-parallel workers share tensors there),
and the hub is off (HF_HUB_OFFLINE: the model is local). Readiness is `ready_path`
(vLLM: /health; /v1/models works for every OpenAI-compatible server without a key).

`secrets.api_key` names a Secret holding a bearer key: the engine container gets it from the
Secret (never from the recipe) and so do the infer steps that send it; without one the engine
answers anyone the NetworkPolicy lets in (pods of the namespace).

Objects are labelled app.kubernetes.io/part-of=mmjobs and app.kubernetes.io/component=serve
(the chart's serve NetworkPolicy: port 8000 from the namespace, egress to DNS, S3, MLflow),
app.kubernetes.io/name=mmjobs-engine and `mmjobs.io/engine-run` (a hash of experiment and run
id), by which the pipeline's clean-up step finds every engine of its run.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mmjobs.config_base import StrictModel
from mmjobs.config_cluster import _quantity
from mmjobs.eval.endpoint import EndpointClient

APP_NAME = "mmjobs-engine"  # app.kubernetes.io/name of engines
MANAGER = "mmjobs-engine"  # app.kubernetes.io/managed-by
RUN_LABEL = "mmjobs.io/engine-run"
MODEL_DIR = "/models/model"  # where the init container puts the model ({model} in args)
PLACEHOLDERS = ("model", "name", "port")
VLLM_ARGS = ["--model", "{model}", "--served-model-name", "{name}", "--host", "0.0.0.0",
             "--port", "{port}"]
# Where the engine's caches go: the root filesystem is read-only.
CACHE_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "HF_HOME": "/tmp/.cache/hf",
             "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "PYTHONUNBUFFERED": "1"}
MAX_NAME = 40  # pods are <name>-<10>-<5>: stays a 63-character DNS label
# The bearer key (`secrets.api_key`): the Secret's key, and the variable the engine container
# and the infer steps get it as (vLLM reads VLLM_API_KEY itself).
API_KEY_SECRET_KEY = "api_key"
API_KEY_ENV = "MMJOBS_ENGINE_API_KEY"
VLLM_KEY_ENV = "VLLM_API_KEY"


class EngineSecrets(StrictModel):
    """Names of the Kubernetes Secrets an engine reads; never the credentials themselves."""

    api_key: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="A Secret whose key "
        f"`{API_KEY_SECRET_KEY}` holds a bearer key for the engine: the engine container gets "
        f"it as ${API_KEY_ENV} and ${VLLM_KEY_ENV} (vLLM then refuses /v1 requests without "
        f"it; other servers: pass it in args, e.g. --api-key $({API_KEY_ENV})) and the infer "
        "steps send it. Cluster runs only: a local run's engine listens on 127.0.0.1 "
        "without one.")


class EngineSpec(StrictModel):
    """The recipe's `eval.engine`: evaluate through a serving engine the pipeline starts."""

    # Where the bearer key of `secrets.api_key` is read from and into (pipelines wire it).
    KEY_IN_SECRET: ClassVar[str] = API_KEY_SECRET_KEY
    KEY_ENV: ClassVar[str] = API_KEY_ENV

    image: str = Field(min_length=1, description="The engine's image, e.g. "
                       "vllm/vllm-openai:v0.11.0 (any OpenAI-compatible server).")
    command: list[str] = Field(default_factory=list, description="The container command; "
                               "empty: the image's entrypoint (vllm-openai's is the server).")
    args: list[str] = Field(default_factory=lambda: list(VLLM_ARGS), description="The "
                            "engine's command line; {model} is the model's local folder "
                            f"({MODEL_DIR}), {{name}} the served model name, {{port}} the "
                            "port. Default: vLLM's (--model {model} --served-model-name "
                            "{name} --host 0.0.0.0 --port {port}).")
    port: int = Field(8000, ge=1, le=65535, description="Where the engine listens (the "
                      "chart's serve NetworkPolicy admits 8000).")
    served_model_name: str = Field("model", min_length=1, description="The name the infer "
                                   "steps send as `model` ({name} in args).")
    ready_path: str = Field("/health", pattern=r"^/", description="GET path answering 200 "
                            "once the engine serves (vLLM: /health; any: /v1/models).")
    startup_timeout_s: float = Field(1800.0, gt=0, description="How long pulling the image, "
                                     "copying the model and loading it may take.")
    max_restarts: int = Field(2, ge=0, description="Engine crashes after which the step "
                              "fails (with the log tail) without waiting for the timeout.")
    gpus: int | None = Field(None, ge=0, description="NVIDIA GPUs of the engine pod; default "
                             "what an infer step gets (cluster.stages.infer, else "
                             "cluster.gpus).")
    cpu: str | None = Field(None, description="CPU request; default an infer step's.")
    memory: str | None = Field(None, description="Memory request = limit; default an infer "
                               "step's.")
    shm_size: str = Field("8Gi", description="/dev/shm (memory-backed) size.")
    model_size: str = Field("100Gi", description="Size limit of the emptyDir the model is "
                            "copied into: at least the model's size.")
    secrets: EngineSecrets = Field(default_factory=EngineSecrets,
                                   description="Kubernetes Secrets the engine reads (names, "
                                   "never the credentials): `api_key`, its bearer key.")
    env: dict[str, str] = Field(default_factory=dict, description="Plain env of the engine "
                                "container (e.g. VLLM_LOGGING_LEVEL); never credentials "
                                "(recipes refuse credential-like keys).")
    endpoint: EndpointClient = Field(default_factory=EndpointClient, description="The infer "
                                     "steps' client settings (concurrency, retries, "
                                     "agreement_sample, ...); the URL and model come from "
                                     "the engine.")
    local_serve: dict[str, Any] = Field(default_factory=dict, description="`mmjobs run` "
                                        "(no cluster): settings of the `mmjobs serve` that "
                                        "stands in for the engine on 127.0.0.1, e.g. "
                                        "{max_batch_size: 8}.")

    @field_validator("cpu", "memory", "shm_size", "model_size", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        return _quantity(value)

    @model_validator(mode="after")
    def _placeholders(self) -> EngineSpec:
        used: set[str] = set()
        for arg in (*self.command, *self.args):
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
            except ValueError as e:
                raise _args_error(f"args: {arg!r}: {e}; write literal braces as {{{{ }}}}"
                                  ) from None
            unknown = fields - set(PLACEHOLDERS)
            if unknown:
                raise _args_error(f"args: {arg!r} names {{{', '.join(sorted(unknown))}}}; "
                                  "the placeholders are {model}, {name} and {port}")
            used |= fields
        if "model" not in used:
            raise _args_error("args: no {model}: the engine would not load the evaluated "
                              "model; pass it, e.g. --model {model}")
        if self.secrets.api_key and self.ready_path.startswith("/v1"):
            raise _args_error(f"ready_path: {self.ready_path} needs the bearer key, which "
                              "Kubernetes' probes do not send; use an unauthenticated path "
                              "(vLLM, SGLang, TGI: /health)")
        return self

    def command_line(self) -> tuple[list[str], list[str]]:
        """(command, args) with the placeholders filled in."""
        values = {"model": MODEL_DIR, "name": self.served_model_name, "port": str(self.port)}
        return ([c.format(**values) for c in self.command],
                [a.format(**values) for a in self.args])


def _args_error(message: str) -> PydanticCustomError:
    # The message verbatim (braces included), without pydantic's "Value error, " prefix.
    return PydanticCustomError("engine_args", "{message}", {"message": message})


def run_key(experiment: str, run_id: str) -> str:
    """The `mmjobs.io/engine-run` label value of a pipeline run (a valid label value)."""
    return hashlib.sha256(f"{experiment}\0{run_id}".encode()).hexdigest()[:16]


def engine_name(experiment: str, run_id: str, label: str) -> str:
    """The Deployment/Service name of the engine of model `label` in a run: a DNS-1035 label
    of at most `MAX_NAME` characters, unique per (experiment, run, label)."""
    digest = hashlib.sha256(f"{experiment}\0{run_id}\0{label}".encode()).hexdigest()[:8]
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", label.lower())).strip("-")
    room = MAX_NAME - len(APP_NAME) - len(digest) - 2
    slug = slug[:room].strip("-")
    return f"{APP_NAME}-{slug}-{digest}" if slug else f"{APP_NAME}-{digest}"


def selector(name: str) -> dict[str, str]:
    """The Deployment and Service selector of engine `name`."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": name}


def labels(name: str, run: str) -> dict[str, str]:
    """Labels of every object and pod of engine `name` of run `run` (`run_key`)."""
    return {**selector(name), "app.kubernetes.io/component": "serve",
            "app.kubernetes.io/part-of": "mmjobs", "app.kubernetes.io/managed-by": MANAGER,
            RUN_LABEL: run}


def url(name: str, namespace: str, port: int) -> str:
    """The engine's OpenAI API base inside the cluster."""
    return f"http://{name}.{namespace}.svc.cluster.local:{port}/v1"

