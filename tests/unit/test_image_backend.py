"""`mmjobs.image_backend`: torchvision-backed image processors when torchvision works, PIL
otherwise — never a crash from a torchvision built for another torch.

The tests marked `torchvision` need a working torchvision: here they skip, and
`make test-torchvision` (part of `make test`) runs them in `.venv-torchvision`, where a skip is
a failure (MMJOBS_REQUIRE_TORCHVISION=1)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmjobs import image_backend as backend
from mmjobs.models.replicas._common import published_dir

CLIP_336 = published_dir("openai--clip-vit-large-patch14-336")
REQUIRE = "MMJOBS_REQUIRE_TORCHVISION"


@pytest.fixture(autouse=True)
def fresh_choice():
    backend.image_backend.cache_clear()
    yield
    backend.image_backend.cache_clear()


def needs_torchvision() -> None:
    problem = backend.torchvision_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE):
        pytest.fail(f"{REQUIRE} is set but {problem}")
    pytest.skip(f"{problem}; `make test-torchvision` runs this test in .venv-torchvision")


def test_the_choice_follows_what_this_environment_has():
    expected = "pil" if backend.torchvision_problem() else "torchvision"
    assert backend.image_backend() == expected
    assert backend.processor_kwargs() == {"backend": expected}


def test_the_environment_variable_overrides_and_unknown_values_are_named(monkeypatch):
    monkeypatch.setenv(backend.ENV, "PIL")
    assert backend.image_backend() == "pil"
    backend.image_backend.cache_clear()
    monkeypatch.setenv(backend.ENV, "opencv")
    with pytest.raises(backend.ImageBackendError, match=r"MMJOBS_IMAGE_BACKEND='opencv'.*pil"):
        backend.image_backend()


def test_asking_for_torchvision_where_it_cannot_load_says_why(monkeypatch):
    if backend.torchvision_problem() is None:
        pytest.skip("torchvision works here")
    monkeypatch.setenv(backend.ENV, "torchvision")
    with pytest.raises(backend.ImageBackendError, match=r"torchvision.*paired with your torch"):
        backend.image_backend()


def broken_torchvision(root) -> dict[str, str]:
    """An environment with PyPI's torchvision beside a CPU-only torch, as far as Python can
    tell: installed (metadata, which is all transformers checks) but `import` raises."""
    package = root / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    info = root / "torchvision-0.28.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop(backend.ENV, None)
    return env


def test_a_torchvision_built_for_another_torch_stops_a_stage_with_one_line(tmp_path):
    env = broken_torchvision(tmp_path)
    config = tmp_path / "pretokenize.yaml"
    config.write_text(f"dataset: {tmp_path}/none\nmodel: {CLIP_336}\noutput: {tmp_path}/out\n")
    done = subprocess.run([sys.executable, "-m", "mmjobs.stages.pretokenize", "--config",
                           str(config)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert ("torchvision does not import (RuntimeError: operator torchvision::nms does not "
            "exist)") in done.stderr
    assert "pip uninstall torchvision" in done.stderr


def test_doctor_reports_a_broken_torchvision(tmp_path):
    env = {**broken_torchvision(tmp_path), "MMJOBS_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "mmjobs.cli", "doctor"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    line = next(x for x in done.stdout.splitlines() if "images" in x)
    assert line.startswith("[FAIL]") and "torchvision::nms" in line, done.stdout


def photo(width: int = 640, height: int = 480) -> Image.Image:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * y) % 251], -1)
    return Image.fromarray((rgb + rng.integers(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8))


@pytest.mark.torchvision
def test_where_torchvision_works_processors_load_its_backend():
    needs_torchvision()
    from transformers import AutoImageProcessor

    assert backend.image_backend() == "torchvision"
    processor = AutoImageProcessor.from_pretrained(CLIP_336, **backend.processor_kwargs())
    assert type(processor).__name__ == "CLIPImageProcessor"  # not ...Pil


@pytest.mark.torchvision
def test_the_two_backends_give_nearly_the_same_pixels_on_clip_336():
    needs_torchvision()
    from transformers import AutoImageProcessor

    from mmjobs.data.loader import run_image_processor

    images = [photo(), photo(500, 700)]
    out = {name: run_image_processor(
        AutoImageProcessor.from_pretrained(CLIP_336, backend=name), images)["pixel_values"]
        for name in ("pil", "torchvision")}
    assert out["pil"].shape == out["torchvision"].shape == (2, 3, 336, 336)
    diff = (out["pil"] - out["torchvision"]).abs()
    assert float(diff.max()) < 0.05 and float(diff.mean()) < 0.001, (diff.max(), diff.mean())


@pytest.mark.torchvision
def test_a_model_loaded_with_either_backend_gets_the_same_tokens_and_close_pixels(
        tiny_llava_dir, monkeypatch):
    """The loading path inference uses (`load_for_inference`) with each backend: the processor class
    follows the choice, the prompt's tokens (image tokens expanded) are identical and the
    pixels within the backends' tolerance."""
    needs_torchvision()
    from mmjobs.eval.generate import load_for_inference

    prompt = "USER: <image>\nWhat is the highest bar? ASSISTANT:"
    out = {}
    for name in ("pil", "torchvision"):
        monkeypatch.setenv(backend.ENV, name)
        backend.image_backend.cache_clear()
        processor = load_for_inference(str(tiny_llava_dir)).processor
        assert type(processor.image_processor).__name__.endswith("Pil") == (name == "pil")
        out[name] = processor(text=[prompt], images=[photo(300, 200)], return_tensors="pt")
    assert out["pil"]["input_ids"].tolist() == out["torchvision"]["input_ids"].tolist()
    diff = (out["pil"]["pixel_values"] - out["torchvision"]["pixel_values"]).abs()
    assert float(diff.max()) < 0.05, float(diff.max())
