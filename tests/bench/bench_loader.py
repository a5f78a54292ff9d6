"""Loader throughput: pretokenized shards vs on-the-fly processing of the same samples.

Run: `.venv/bin/python -m tests.bench.bench_loader [--samples N] [--runs R] [--workers W]`.

On-the-fly is what LLaVA's `LazySupervisedDataset` does in `__getitem__`: read the sample's
JSON, open its image file, run the image processor, render the conversation template and
tokenize it (whole conversation, then each round's instruction again to find the label mask).
Pretokenized reads `input_ids`/`labels`/image bytes from the memory-mapped shard cache and runs
only the image decode + processor. Both feed the same padded collator, batch size 8, random
order. Two workloads: with images (CLIP-336 processing of a 640x480 JPEG per sample dominates
both paths) and text-only (isolates what pretokenizing saves). Figures are medians over
`--runs` full passes; the one-off shard cache build is timed separately.

First, the image cost per sample before and after mmjobs' image path: *before* is a full
decode and the PIL image processor (what LLaVA's loader does with transformers' slow
processor); *after* is `decode_rgb(min_edge=...)` (large JPEGs decoded at the scale the
processor needs) and the backend `mmjobs.image_backend` picks (torchvision's when it works).
Two image sizes: 640x480 (COCO, most of LLaVA-665k) and 2592x1944 (a 5 MP photo). The loader
comparison then runs the pretokenized path with the *after* image path and the on-the-fly path
with the *before* one, and the pretokenized samples/s one core delivers is set against what one
H100 consumes for LLaVA-1.5-7B LoRA (`mmjobs plan llava-dataengine`: its FLOPs at 40% MFU).

Everything is local and tiny: a BPE tokenizer trained here with `tokenizers`, wrapped in
`PreTrainedTokenizerFast`; CLIP-336's image processor from its vendored published config (no
downloads). Run it in `.venv-torchvision` (`make bench` does) for the torchvision figures;
in `.venv` the *after* column is PIL with the reduced decode only.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from mmjobs import storage
from mmjobs.data.images import decode_rgb, processor_min_edge
from mmjobs.data.loader import PaddedCollator, build_dataloader
from mmjobs.image_backend import image_backend, torchvision_problem
from mmjobs.models.replicas._common import published_dir

IMAGE_TOKENS = 576
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the human's questions.")
SCHEMA = pa.schema([
    ("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("images", pa.list_(pa.binary())), ("num_image_tokens", pa.int32()), ("length", pa.int32()),
])


# --------------------------------------------------------------------------- synthetic corpus


def make_corpus(root: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Write LLaVA-format sample JSONs and 640x480 JPEGs; return the samples."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "va", "ze", "chart", "bar",
                 "red", "blue", "value", "year", "line", "axis", "the", "of"]
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(3000)]

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words, rng.integers(lo, hi))) + "."

    (root / "samples").mkdir(parents=True)
    (root / "images").mkdir()
    samples = []
    for i in range(n):
        turns = []
        for t in range(int(rng.integers(1, 5))):
            question = sentence(6, 20)
            turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
            turns.append({"from": "gpt", "value": " ".join(sentence(4, 25)
                                                           for _ in range(rng.integers(1, 4)))})
        image = f"images/{i:05d}.jpg"
        im = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) // 4 + 96)
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            draw.rectangle([x, y, x + rng.integers(20, 80), y + rng.integers(20, 80)],
                           fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(root / image, quality=90)
        sample = {"id": f"s{i:05d}", "image": image, "conversations": turns}
        (root / "samples" / f"{sample['id']}.json").write_text(json.dumps(sample))
        samples.append(sample)
    return samples


def make_tokenizer(samples: list[dict[str, Any]]):
    """Train a small byte-level BPE on the corpus and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    texts = [SYSTEM] + [t["value"] for s in samples for t in s["conversations"]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<image>"])


def make_image_processor(backend: str):
    """LLaVA-1.5's processor (openai/clip-vit-large-patch14-336's published config)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(
        published_dir("openai--clip-vit-large-patch14-336"), backend=backend)


def photo_jpeg(width: int, height: int, rng: np.random.Generator) -> bytes:
    """A JPEG with smooth gradients, noise and hard-edged shapes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 220], -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape) + 20, 0, 255)
                            .astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))
        draw.rectangle([x0, y0, x0 + int(rng.integers(10, 100)), y0 + int(rng.integers(10, 100))],
                       fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_cost(images: int, runs: int) -> dict[str, dict[str, float]]:
    """Median ms per image of decode + processor, before and after (module docstring)."""
    before, after = make_image_processor("pil"), make_image_processor(image_backend())
    min_edge = processor_min_edge(after)
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for width, height in ((640, 480), (2592, 1944)):
        data = [photo_jpeg(width, height, rng) for _ in range(images)]
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(runs):  # interleaved, so load spikes hit both alike
            for name, processor, edge in (("before", before, None), ("after", after, min_edge)):
                start = time.perf_counter()
                for d in data:
                    processor([decode_rgb(d, edge)], return_tensors="pt")
                times[name].append(1000 * (time.perf_counter() - start) / len(data))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"{width}x{height}"] = {**med, "speedup": med["before"] / med["after"]}
    return out


def h100_samples_per_s() -> float | None:
    """What one H100 consumes for LLaVA-1.5-7B LoRA, from `mmjobs plan llava-dataengine`."""
    done = subprocess.run([sys.executable, "-m", "mmjobs.cli", "plan", "llava-dataengine"],
                          capture_output=True, text=True, timeout=600)
    found = re.search(r"one H100 at \d+% MFU takes ([\d.]+) samples/s", done.stdout)
    return float(found.group(1)) if found else None


# --------------------------------------------------------------------------- LLaVA-style path


def llava_tokenize(conversations: list[dict[str, str]], tokenizer, image_token_id: int,
                   with_image: bool) -> tuple[list[int], list[int]]:
    """LLaVA v1 `preprocess`: template, tokenize, then mask instructions round by round."""
    rounds = []
    for k in range(0, len(conversations), 2):
        question = conversations[k]["value"]
        if not with_image:
            question = question.replace("<image>\n", "")
        rounds.append((f"USER: {question} ASSISTANT: ", conversations[k + 1]["value"] + "</s>"))
    prompt = SYSTEM + " " + "".join(q + a for q, a in rounds)
    input_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    labels = list(input_ids)
    cursor = len(tokenizer(SYSTEM + " ", add_special_tokens=False).input_ids)
    labels[:cursor] = [-100] * cursor
    for q, a in rounds:  # like LLaVA: re-tokenize each round to find where the answer starts
        q_len = len(tokenizer(q, add_special_tokens=False).input_ids)
        a_len = len(tokenizer(q + a, add_special_tokens=False).input_ids) - q_len
        labels[cursor:cursor + q_len] = [-100] * q_len
        cursor += q_len + a_len
    if with_image:  # expand the one <image> placeholder to the vision tower's token count
        at = input_ids.index(image_token_id)
        input_ids[at:at + 1] = [image_token_id] * IMAGE_TOKENS
        labels[at:at + 1] = [-100] * IMAGE_TOKENS
    return input_ids, labels


class OnTheFlyDataset(Dataset):
    """LLaVA `LazySupervisedDataset`-style: all the work per sample in `__getitem__`."""

    def __init__(self, root: Path, ids: list[str], tokenizer, processor, with_images: bool):
        self.root, self.ids, self.tokenizer, self.processor = root, ids, tokenizer, processor
        self.with_images = with_images
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = json.loads((self.root / "samples" / f"{self.ids[i]}.json").read_text())
        input_ids, labels = llava_tokenize(sample["conversations"], self.tokenizer,
                                           self.image_token_id, self.with_images)
        out: dict[str, Any] = {"id": sample["id"], "input_ids": np.asarray(input_ids, np.int32),
                               "labels": np.asarray(labels, np.int32), "num_images": 0}
        if self.with_images:
            image = Image.open(self.root / sample["image"]).convert("RGB")
            out["image_features"] = {"pixel_values": self.processor(
                [image], return_tensors="pt")["pixel_values"]}
            out["num_images"] = 1
        return out


def pretokenize(root: Path, samples: list[dict[str, Any]], tokenizer, with_images: bool,
                out: Path) -> Path:
    """What the pretokenize stage does once, offline: the same tokens, plus image bytes."""
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    rows = []
    for s in samples:
        ids, labels = llava_tokenize(s["conversations"], tokenizer, image_token_id, with_images)
        rows.append({"id": s["id"], "input_ids": ids, "labels": labels,
                     "images": [(root / s["image"]).read_bytes()] if with_images else [],
                     "num_image_tokens": IMAGE_TOKENS if with_images else 0,
                     "length": len(ids)})
    out.mkdir(parents=True)
    for k in range(0, len(rows), 128):
        pq.write_table(pa.Table.from_pylist(rows[k:k + 128], schema=SCHEMA),
                       out / f"shard-{k // 128:05d}.parquet")
    (out / "card.json").write_text(json.dumps({"rows": len(rows), "pad_token_id": 1}))
    storage.commit_dir(out)
    return out


# --------------------------------------------------------------------------- timing


def time_pass(loader) -> float:
    start = time.perf_counter()
    n = sum(len(batch["ids"]) for batch in loader)
    return n / (time.perf_counter() - start)


def cost_breakdown(root: Path, ids: list[str], tokenizer, processor) -> dict[str, float]:
    """Median milliseconds per sample of each on-the-fly step (explains the ratios)."""
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    steps: dict[str, list[float]] = {"json": [], "tokenize": [], "image decode": [],
                                      "image processor": []}
    for sample_id in ids[:32]:
        t0 = time.perf_counter()
        sample = json.loads((root / "samples" / f"{sample_id}.json").read_text())
        t1 = time.perf_counter()
        llava_tokenize(sample["conversations"], tokenizer, image_token_id, True)
        t2 = time.perf_counter()
        image = Image.open(io.BytesIO((root / sample["image"]).read_bytes())).convert("RGB")
        t3 = time.perf_counter()
        processor([image], return_tensors="pt")
        t4 = time.perf_counter()
        for key, (a, b) in zip(steps, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True):
            steps[key].append(1000 * (b - a))
    return {k: statistics.median(v) for k, v in steps.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=24, help="images per size in the "
                        "before/after image cost")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers for both paths (0 = measure per-sample cost "
                        "in one process; steadier on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per-sample CPU cost, not how many cores the box lends us

    results: dict[str, dict[str, float]] = {}
    backend = image_backend()
    print(f"bench_loader: image cost per sample, one thread; after = {backend} processor"
          + (f" ({torchvision_problem()})" if backend == "pil" else ""))
    results["image cost"] = {}
    for size, cost in image_cost(args.images, args.runs).items():
        results["image cost"][size] = cost["speedup"]
        print(f"  {size:<10} before (full decode + PIL processor) {cost['before']:7.2f} ms | "
              f"after (decode at the processor's scale + {backend}) {cost['after']:7.2f} ms | "
              f"{cost['speedup']:5.2f}x")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(tmp)
        samples = make_corpus(root / "corpus", args.samples)
        tokenizer = make_tokenizer(samples)
        processor, after = make_image_processor("pil"), make_image_processor(backend)
        ids = [s["id"] for s in samples]
        costs = cost_breakdown(root / "corpus", ids, tokenizer, processor)
        print(f"bench_loader: {args.samples} samples (1-4 rounds, 640x480 JPEG each), "
              f"batch 8, workers={args.workers}, median of {args.runs} passes")
        print("  on-the-fly cost per sample (ms, median): "
              + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
        for workload, with_images in (("with images", True), ("text only", False)):
            shards = pretokenize(root / "corpus", samples, tokenizer, with_images,
                                 root / f"shards-{with_images}")
            start = time.perf_counter()
            pretok = build_dataloader(
                shards, batch_size=8, mode="random", max_length=None, seed=0,
                num_workers=args.workers, cache_dir=root / "cache",
                image_processor=after if with_images else None)
            cache_s = time.perf_counter() - start
            fly = DataLoader(OnTheFlyDataset(root / "corpus", ids, tokenizer, processor,
                                             with_images),
                             batch_size=8, shuffle=True, num_workers=args.workers,
                             collate_fn=PaddedCollator(1), persistent_workers=args.workers > 0,
                             generator=torch.Generator().manual_seed(0))
            time_pass(pretok), time_pass(fly)  # warm-up: page cache, workers, lazy imports
            rates = {"pretokenized": [], "on_the_fly": []}
            for _ in range(args.runs):  # interleaved, so load spikes hit both paths alike
                rates["pretokenized"].append(time_pass(pretok))
                rates["on_the_fly"].append(time_pass(fly))
            med = {k: statistics.median(v) for k, v in rates.items()}
            results[workload] = {**med, "ratio": med["pretokenized"] / med["on_the_fly"],
                                 "cache_build_s": cache_s}
            print(f"  {workload:<12} pretokenized {med['pretokenized']:8.1f} samples/s | "
                  f"on-the-fly {med['on_the_fly']:8.1f} samples/s | ratio "
                  f"{results[workload]['ratio']:5.2f}x | one-off cache build {cache_s:.2f}s")
            spread = {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in rates.items()}
            print(f"  {'':<12} run range (samples/s): {spread}")
    h100 = h100_samples_per_s()
    fed = results["with images"]["pretokenized"]
    if h100:
        results["feed"] = {"one_core": fed, "h100": h100, "cores_per_h100": h100 / fed}
        print(f"  one core feeds {fed:.1f} samples/s with images; one H100 takes {h100:.2f} "
              f"samples/s for LLaVA-1.5-7B LoRA at 2048 tokens (mmjobs plan, 40% MFU): "
              f"{fed / h100:.1f}x what it consumes, {h100 / fed:.2f} cores per H100")
    return results


if __name__ == "__main__":
    main()
