"""Write a small canonical chart dataset (samples.jsonl, dataset.json, PNG bar charts) for tests.

Independent of the prepare stage on purpose: pre-tokenization tests need a committed canonical
dataset with known contents, not whatever the converters make today.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

from mmjobs import storage


def bar_chart_png(values: list[int], size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """A tiny bar chart drawn with PIL, PNG-encoded."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    bar = max(1, width // (2 * len(values)))
    top = max(values) or 1
    for i, v in enumerate(values):
        x = bar // 2 + i * 2 * bar
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.rectangle([x, height - 1 - int((height - 4) * v / top), x + bar, height - 1],
                       fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def chart_samples(n: int, *, long_every: int = 0, assistant_image_every: int = 0
                  ) -> list[dict[str, Any]]:
    """`n` canonical samples over images `images/chart-<i>.png`.

    Every sample asks about one chart; every third one has a second turn with a second chart.
    `long_every=k` makes every k-th sample's answer very long (for `too_long` rejects);
    `assistant_image_every=k` puts an `<image>` in every k-th answer (image generation).
    """
    samples = []
    for i in range(n):
        values = [(i * 7 + j * 13) % 50 + 1 for j in range(4)]
        answer = f"The largest bar is {max(values)}; 가장 큰 값은 {max(values)}입니다."
        if long_every and i % long_every == long_every - 1:
            answer = " ".join(["The chart shows growth in 2021 and 2022."] * 20)
        images = [f"images/chart-{i}.png"]
        turns = [{"role": "system", "content": "You read charts."},
                 {"role": "user", "content": f"<image>\nWhat is the largest value? (#{i})"},
                 {"role": "assistant", "content": answer}]
        if i % 3 == 2:
            images.append(f"images/chart-{i}-b.png")
            turns += [{"role": "user", "content": "막대 그래프를 표로 바꾸세요. <image>"},
                      {"role": "assistant", "content": f"| 값 | {' | '.join(map(str, values))} |"}]
        if assistant_image_every and i % assistant_image_every == 0:
            # `images` follows the order of the <image> markers: this one is in turn 2.
            images.insert(1, f"images/chart-{i}-gen.png")
            turns[2]["content"] = f"Here is a redrawn chart: <image> {answer}"
        samples.append({"id": f"chart-{i}", "images": images, "conversations": turns,
                        "meta": {"source": "test"}})
    return samples


_APPROVE = ("Correct, verified.", "Yes, exactly right.", "Confirmed, good.")
_DISAPPROVE = ("Wrong, unverified.", "No, that is off.", "Unsure, bad.")


def preference_pairs(n: int, *, style: str = "answer", start: int = 0
                     ) -> list[dict[str, Any]]:
    """`n` canonical preference records over images `images/pair-<i>.png`.

    style="answer": chosen = the chart's largest value, rejected = a wrong value (a DPO set).
    style="keyword": chosen answers end with an approving phrase ("Correct, verified.", ...),
    rejected ones with a disapproving one ("Wrong, unverified.", ...), three of each in
    rotation, so a random value head does not already order them (a preference a reward
    model has to learn, and can carry to unseen pairs).
    `start` offsets ids, values and images (a held-out split with `start=n_train`).
    """
    pairs = []
    for i in range(start, start + n):
        values = [(i * 7 + j * 13) % 50 + 1 for j in range(4)]
        right, wrong = max(values), max(values) + 1 + i % 9
        if style == "answer":
            chosen, rejected = f"The largest bar is {right}.", f"The largest bar is {wrong}."
        elif style == "keyword":
            answer = f"The largest bar is {right if i % 2 else wrong}."
            chosen = f"{answer} {_APPROVE[i % 3]}"
            rejected = f"{answer} {_DISAPPROVE[(i + 1) % 3]}"
        else:
            raise ValueError(f"style {style!r}")
        pairs.append({"id": f"pair-{i}", "images": [f"images/pair-{i}.png"],
                      "prompt": [{"role": "user",
                                  "content": f"<image>\nWhat is the largest value? (#{i})"}],
                      "chosen": chosen, "rejected": rejected, "meta": {"source": "test"}})
    return pairs


def write_chart_dataset(root: Path, samples: list[dict[str, Any]], *,
                        extra_lines: list[str] = (), image_size: tuple[int, int] = (48, 40),
                        skip_images: set[str] = frozenset(), kind: str = "sample") -> Path:
    """Write samples (or preference records, `kind="preference"`) + their images + card under
    `root` (not committed).

    `extra_lines` are appended to samples.jsonl verbatim (malformed rows);
    images in `skip_images` are not written (missing-image rejects).
    """
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(s, ensure_ascii=False) for s in samples] + list(extra_lines)
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for k, sample in enumerate(samples):
        paths = [*sample["images"], *sample.get("chosen_images", ()),
                 *sample.get("rejected_images", ())]
        for j, rel in enumerate(paths):
            if rel in skip_images:
                continue
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bar_chart_png([(k + j * 5 + m * 11) % 30 + 1 for m in range(4)],
                                           image_size, seed=k * 10 + j))
    card = {"kind": kind, "image_root": "", "source": "tests",
            "counts": {"input": len(lines), "accepted": len(samples),
                       "rejected": len(extra_lines)}}
    (root / "dataset.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
    return root


def commit_dataset(local: Path, uri: str, *, image_root: str | None = None) -> str:
    """Commit a dataset dir to `uri` (local or s3://), optionally pointing at another image root."""
    if image_root is not None:
        card = json.loads((local / "dataset.json").read_text())
        card["image_root"] = image_root
        (local / "dataset.json").write_text(json.dumps(card, indent=1))
    storage.put_dir(local, uri)
    return uri
