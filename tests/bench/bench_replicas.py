"""What faithful geometry costs: replica build times, and one forward / training step per replica.

Run: `.venv/bin/python -m tests.bench.bench_replicas [--names NAME ...] [--repeat N]`.

For every replica: the build time (in process, transformers already imported), the directory
size, and for the loadable models the median time of a forward pass on one real-geometry
sample (LLaVA: one 336 px image = 576 image tokens + a short prompt; Chameleon: one 512 px
image = VQ encoding to 1024 codes, then 1024 + text tokens over a 65,536-entry vocabulary) and
of one training step (forward + backward + AdamW) on the same sample.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmjobs.models.replicas import REPLICAS, build_replica

MODELS = ("llava-hf/llava-1.5-7b-hf", "facebook/chameleon-7b")


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up (first-call allocations)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sample(model_dir: Path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.new("RGB", (640, 480), (40, 120, 200))
    text = ("USER: <image>\nWhat is in the picture? ASSISTANT: A blue square."
            if "llava" in model_dir.name else "Describe<image>A blue square.")
    batch = dict(processor(images=image, text=text, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    return model, batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_replicas")
    parser.add_argument("--names", nargs="*", default=list(REPLICAS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import transformers  # noqa: F401  (import cost is not build cost)

    print(f"threads={torch.get_num_threads()}")
    print("| replica | build s | size MB | tokens | forward s | train step s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            out = Path(tmp) / name.replace("/", "--")
            start = time.perf_counter()
            build_replica(name, out)
            build = time.perf_counter() - start
            size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
            row = f"| {name} | {build:.1f} | {size:.1f} |"
            if name not in MODELS:
                print(row + " - | - | - |", flush=True)
                continue
            model, batch = _sample(out)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def forward(model=model, batch=batch):
                with torch.no_grad():
                    model(**batch)

            def step(model=model, batch=batch, optimizer=optimizer):
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()

            fwd = _median_seconds(forward, args.repeat)
            train = _median_seconds(step, args.repeat)
            print(f"{row} {batch['input_ids'].shape[1]} | {fwd:.2f} | {train:.2f} |", flush=True)


if __name__ == "__main__":
    main()
