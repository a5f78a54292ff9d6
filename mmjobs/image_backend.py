"""Which transformers image-processor backend mmjobs loads: torchvision when installed, else PIL.

transformers 5 has two implementations of each image processor: the torchvision one
(`CLIPImageProcessor`, tensor ops, about 2.4x faster per 640x480 image on one CPU core, see
`tests/bench/bench_loader.py`) and the PIL one (`CLIPImageProcessorPil`, NumPy). Every
processor mmjobs loads takes `processor_kwargs()`, so the choice is explicit and
`MMJOBS_IMAGE_BACKEND=pil|torchvision` can override it: the backends' pixel values differ
slightly (within 0.02 after normalisation on CLIP-336), and reproducing a model's scores bit for
bit means evaluating with the backend it was trained with. Pre-tokenization and inference keep
the choice in their cache keys.

A torchvision that is installed but does not import (PyPI's build beside a CPU-only torch:
`operator torchvision::nms does not exist`) cannot be worked around: transformers' image
utilities import it as soon as its metadata is found. `image_backend()` turns that into one
line with the fix — pipeline steps call it before their stage, `mmjobs doctor` reports it —
instead of transformers' `ModuleNotFoundError` traceback deep inside a step.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from mmjobs.config_errors import ConfigError

ENV = "MMJOBS_IMAGE_BACKEND"
BACKENDS = ("torchvision", "pil")


class ImageBackendError(ConfigError):
    """torchvision is installed but broken, or `MMJOBS_IMAGE_BACKEND` asks for what cannot be."""

    def __init__(self, message: str) -> None:
        super().__init__("image processors", [message])


@functools.cache
def torchvision_problem() -> str | None:
    """Why torchvision cannot back the image processors here, or None when it can."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception as e:  # a build for another torch raises RuntimeError, not ImportError
        return f"torchvision does not import ({type(e).__name__}: {e})"
    return None


@functools.cache
def image_backend() -> str:
    """'torchvision' or 'pil': `MMJOBS_IMAGE_BACKEND` if set, else torchvision when installed.

    Raises:
        ImageBackendError: torchvision is installed but does not import, or the variable names
            an unknown backend.
    """
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted and wanted not in BACKENDS:
        raise ImageBackendError(f"{ENV}={wanted!r}: use one of {', '.join(BACKENDS)} (or unset "
                                "it to use torchvision when it is installed)")
    problem = torchvision_problem()
    installed = importlib.util.find_spec("torchvision") is not None
    if installed and problem:
        raise ImageBackendError(
            f"{problem}. transformers imports torchvision whenever it is installed, so image "
            "processing cannot run: install the torchvision release paired with your torch "
            "(README: Install), or `pip uninstall torchvision` to use the PIL processors")
    if wanted == "torchvision" and problem:
        raise ImageBackendError(f"{ENV}=torchvision but {problem}; install the torchvision "
                                "release paired with your torch (README: Install) or unset it")
    return wanted or ("pil" if problem else "torchvision")


def processor_kwargs() -> dict[str, str]:
    """Keyword arguments for `AutoProcessor`/`AutoImageProcessor.from_pretrained`."""
    return {"backend": image_backend()}
