"""KFP components: one lightweight Python component per stage, one file each.

Each file holds the component function (self-contained: KFP serializes its source, so imports
live inside it) and `op(image)`, which wraps it with `dsl.component(base_image=image)`. The
body only imports `mmjobs.stages.<stage>`, fills in the URIs wired from upstream steps (KFP
passes strings; datasets and models stay in the store), validates the config and calls
`main`. `install_kfp_package=False`: the stage images ship kfp themselves, and the local
runner uses the current environment.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kfp import dsl

# Stage name -> component module under pipelines.components.
MODULES = {
    "make-tiny-model": "make_tiny_model",
    "prepare": "prepare",
    "mix": "mix",
    "pretokenize": "pretokenize",
    "train": "train",
    "apply-connector": "apply_connector",
    "build-moe-connector": "build_moe_connector",
    "merge": "merge",
    "infer": "infer",
    "evaluate": "evaluate",
    "report": "report",
    "import": "import_",
    "convert": "convert",
    "serve": "serve",
    "deploy": "deploy",
}


def component(stage: str, image: str) -> Callable[..., dsl.PipelineTask]:
    """The KFP component running `stage` in `image`."""
    module = importlib.import_module(f"pipelines.components.{MODULES[stage]}")
    return dsl.component(module.COMPONENT, base_image=image, install_kfp_package=False)
