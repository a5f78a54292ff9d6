"""The stage registry: every module in `mmjobs/stages/` is a stage that declares itself.

A stage module ends with `STAGE = Stage(...)` (`mmjobs.stage_contract.Stage`); nothing else
lists stages. Names come from the module names without importing them (`make_tiny_model.py`
is `make-tiny-model`, `import_.py` is `import`), so `mmjobs --help` stays fast; `get(name)`
imports the one module a command needs. Readers: the CLI (`mmjobs stage NAME`), the KFP
components (`pipelines/components.py`, whose body is `run_component`), the pipeline builder
(configs, images, wired inputs), the cluster settings (GPUs, retries) and the images' import
checks (`check_imports`).

    python -c "import mmjobs.stages.registry as r; r.check_imports('train')"
"""

from __future__ import annotations

import functools
import importlib
import json
import keyword
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when needed: `names()` must stay cheap for `mmjobs --help`
    from mmjobs.stage_contract import Stage

# Modules of this package that are not stages.
SHARED = frozenset({"registry"})


class UnknownStageError(KeyError):
    """No stage of that name; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def module_name(stage: str) -> str:
    """The module of a stage name (`build-moe-connector` -> `build_moe_connector`)."""
    stem = stage.replace("-", "_")
    return f"{stem}_" if keyword.iskeyword(stem) else stem


def names() -> list[str]:
    """Every stage's name, sorted (found from the module names; nothing is imported)."""
    here = [str(Path(__file__).parent)]
    return sorted(m.name.rstrip("_").replace("_", "-") for m in pkgutil.iter_modules(here)
                  if m.name not in SHARED and not m.name.startswith("_"))


def get(name: str) -> Stage:
    """The declaration of stage `name` (imports its module).

    Raises:
        UnknownStageError: no such stage (the message lists them).
    """
    from mmjobs.stage_contract import Stage

    if name not in names():
        raise UnknownStageError(f"no stage {name!r}; available: {', '.join(names())}")
    module = importlib.import_module(f"{__package__}.{module_name(name)}")
    stage = getattr(module, "STAGE", None)
    if not isinstance(stage, Stage) or stage.name != name:
        raise TypeError(f"{module.__name__} must end with STAGE = Stage(name={name!r}, ...)")
    return stage


def stages() -> list[Stage]:
    """Every stage's declaration (imports every stage module)."""
    return [get(name) for name in names()]


def check_imports(image: str) -> list[str]:
    """Import every stage module, the ones that run in `image` (data, train or eval)
    included; raises if one cannot be imported. The images run this at build time.

    Returns:
        The stage names checked (printed as well).
    """
    checked = [s.name for s in stages() if s.image == image]
    if not checked:
        raise ValueError(f"no stage runs in an image named {image!r}")
    print(f"{image} image: stages {', '.join(checked)} import")
    return checked


# --------------------------------------------------------------------------- KFP


def _user_errors_end_the_step(body: Callable[..., str]) -> Callable[..., str]:
    """A stage's user errors (invalid config, its declared `errors` / `usage_errors`, such as
    too many rejected rows) end the step with one line on stderr and exit status 1 or 2, as
    `mmjobs stage` does, instead of KFP's executor printing a traceback; `MMJOBS_DEBUG=1`
    (`mmjobs --debug ...`) keeps the traceback."""

    @functools.wraps(body)
    def run(name: str, config_json: str, *args: Any, **inputs: Any) -> str:
        from pydantic import ValidationError

        from mmjobs.config import ConfigError

        stage = get(name)
        try:
            return body(name, config_json, *args, **inputs)
        except (ConfigError, ValidationError, *stage.usage_errors, *stage.errors) as e:
            if os.environ.get("MMJOBS_DEBUG"):
                raise
            usage = isinstance(e, (ConfigError, ValidationError, *stage.usage_errors))
            message = str(e).removeprefix(f"{name}: ")
            print(f"mmjobs {name}: {message}\n(run with --debug, or MMJOBS_DEBUG=1, for the "
                  "traceback)", file=sys.stderr, flush=True)
            raise SystemExit(2 if usage else 1) from None

    return run


@_user_errors_end_the_step
def run_component(name: str, config_json: str, kfp_run_id: str = "", **inputs: Any) -> str:
    """The body of every stage's KFP component (see `pipelines/components.py`).

    `config_json` is the step's config without its wired inputs; `inputs` are the component's
    other parameters (upstream outputs, launch settings, the stage's knobs: pipeline
    parameters) and output artifacts. `kfp_run_id` (KFP's job id, on a cluster run that makes
    its own folders) replaces the run-id token compiled into the config. Knobs given a value
    set their config fields (their `unset` value sets None), wired inputs go into theirs (an
    optional one left at its default is not wired: the config decides), the config is
    validated, and the stage runs: `main(cfg).output`, or the stage's own `component` body
    when it declares one.
    """
    from mmjobs.stage_contract import KFP_RUN_ID_TOKEN

    stage = get(name)
    if kfp_run_id:
        config_json = config_json.replace(KFP_RUN_ID_TOKEN, kfp_run_id)
    config = json.loads(config_json)
    for knob in stage.knobs:
        value = inputs.pop(knob.input_name, None)
        if value is not None:  # None: the step has no parameter for it
            _set(config, knob.path, None if value == knob.unset else knob.type(value))
    wired: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    declared = {i.name: i for i in stage.inputs}
    for key, value in inputs.items():
        spec = declared.get(key)
        if spec is None or spec.field is None:
            rest[key] = value
        elif spec.default is ... or value != spec.default:
            wired[key] = value
    fields = stage.wire(wired) if stage.wire else {declared[k].field: v for k, v in wired.items()}
    for path, value in fields.items():
        _set(config, path, list(value) if isinstance(value, list | tuple) else value)
    cfg = stage.config.model_validate(config)
    typed = {k: rest.pop(k) for k, kind in stage.outputs.items()
             if kind in STORE_ARTIFACTS and k in rest}  # absent when called outside KFP
    from mmjobs.image_backend import image_backend

    image_backend()  # a broken torchvision: one line now, not a traceback mid-stage
    uri = stage.component(cfg, **rest) if stage.component is not None else stage.main(cfg).output
    for artifact in typed.values():
        point_at_store(artifact, uri, stage=name)
    return uri


# KFP artifact types a stage's output can be declared as: the artifact is not copied, its URI
# is the output's place in the store (KFP keeps it in its lineage; the UI links it).
STORE_ARTIFACTS = frozenset({"Model", "Dataset"})


def point_at_store(artifact: Any, uri: str, *, stage: str) -> None:
    """Make a KFP output artifact (`dsl.Model`, `dsl.Dataset`) stand for the committed output
    at `uri`: KFP records the URI the component leaves on it (no bytes are copied)."""
    artifact.uri = uri
    artifact.metadata.update({"stage": stage, "store_uri": uri})


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    """`data[a][b] = value` for path `a.b` (keeping what else `data[a]` holds)."""
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[last] = value
