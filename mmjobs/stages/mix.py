"""Stage `mix`: several committed canonical datasets -> one (e.g. LLaVA mix665k + DataEngine).

    python -m mmjobs.stages.mix --set 'datasets=[s3://runs/x/prepare-llava, s3://runs/x/prepare-dataengine]'

Samples are copied in the order given (all of the first dataset, then the second, ...); each
keeps its id and gains `meta.mix_source` (the index of its dataset). The datasets must be of
one record kind and share one image root (the folder their image paths are relative to), so
no image is copied: give the prepare steps the same `image_root` (for LLaVA-1.5's data, the
`playground/data` folder holding coco/, gqa/, ocr_vqa/, ...). Ids must be unique across the
datasets (the converters' `id_prefix` option keeps them apart).

The committed output holds `samples.jsonl` and `dataset.json` (kind, counts per input, the
shared image root). A re-run with the same inputs reuses it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.logs import get_logger, progress
from mmjobs.stage_contract import (
    Input,
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    input_fingerprint,
    run_stage,
)

NAME = "mix"
VERSION = 2  # bump when the output changes for the same inputs. 2: README.md
log = get_logger(__name__)


class MixConfig(StageConfig):
    """Concatenate committed canonical datasets that share an image root."""

    datasets: list[str] = Field(min_length=1, description="Committed canonical datasets "
                                "(prepare outputs), in output order.")


class MixResult(StageResult):
    """Where the mixed dataset is and what went in."""

    samples: int
    per_input: list[int]
    image_root: str | None


def main(cfg: MixConfig) -> MixResult:
    """Run the stage; see the module docstring.

    Raises:
        ValueError: datasets of different kinds or image roots, or a repeated id.
        storage.IncompleteDirectoryError: an input is not committed.
    """
    from mmjobs.data.pretokenize import resolve_image_root
    from mmjobs.data.records import CARD_FILE, SAMPLES_FILE, dataset_readme, iter_jsonl
    from mmjobs.layout import README_FILE

    cards = [json.loads(storage.read_text(storage.join(d, CARD_FILE))) for d in cfg.datasets]
    for uri in cfg.datasets:
        storage.read_manifest(uri)  # an uncommitted dataset is never an input
    kinds = {c.get("kind", "sample") for c in cards}
    roots = {resolve_image_root(d, c) for d, c in zip(cfg.datasets, cards, strict=True)}
    problems = []
    if len(kinds) > 1:
        problems.append(f"datasets hold different record kinds ({', '.join(sorted(kinds))})")
    if len(roots) > 1:
        problems.append("datasets have different image roots (" + ", ".join(sorted(roots))
                        + "); prepare them with one image_root so their image paths share it")
    if problems:
        raise ValueError(f"{NAME}: " + "; ".join(problems))
    fp = fingerprint(NAME, VERSION, [input_fingerprint(d) for d in cfg.datasets])

    def mix(stage: StageRun) -> dict:
        seen: set[str] = set()
        per_input: list[int] = []
        image_root = roots.pop()
        with stage.commit({"stage": NAME}) as scratch:
            with open(scratch / SAMPLES_FILE, "w", encoding="utf-8") as f:
                for index, uri in enumerate(cfg.datasets):
                    count = 0
                    rows = iter_jsonl(storage.join(uri, SAMPLES_FILE))
                    for row in progress(rows, desc=f"{NAME} {index + 1}/{len(cfg.datasets)}"):
                        record = _tagged(row, index, seen, uri)
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        count += 1
                    per_input.append(count)
            card = {"kind": kinds.pop(), "image_root": image_root, "source_format": NAME,
                    "inputs": cfg.datasets,
                    "counts": {"input": sum(per_input), "accepted": sum(per_input),
                               "rejected": 0, "by_reason": {}, "per_input": per_input}}
            (scratch / CARD_FILE).write_text(json.dumps(card, indent=1, ensure_ascii=False)
                                             + "\n", encoding="utf-8")
            (scratch / README_FILE).write_text(dataset_readme(card), encoding="utf-8")
        stage.run.log_metrics({"samples": sum(per_input),
                               **{f"samples.input_{i}": n for i, n in enumerate(per_input)}})
        log.info("%s: %s samples from %d datasets -> %s", NAME, per_input, len(per_input),
                 stage.out)
        return card

    return run_stage(cfg, NAME, fp, mix, result=_result, reused=_card,
                     tags={"inputs": str(len(cfg.datasets))})


def _tagged(row: Any, index: int, seen: set[str], uri: str) -> dict[str, Any]:
    """The row's record with `meta.mix_source`; raises on malformed rows and repeated ids."""
    if row.error:
        raise ValueError(f"{row.locator}: {row.error}")
    record = dict(row.data)
    record_id = str(record.get("id"))
    if record_id in seen:
        raise ValueError(f"{NAME}: id {record_id!r} occurs in more than one input (again in "
                         f"{uri}); give the prepare steps distinct id_prefix options")
    seen.add(record_id)
    record["meta"] = {**(record.get("meta") or {}), "mix_source": index}
    return record


def _card(out: str, manifest: storage.Manifest, run: Any) -> dict[str, Any]:
    from mmjobs.data.records import CARD_FILE

    return json.loads(storage.read_text(storage.join(out, CARD_FILE)))


def _result(out: str, card: dict[str, Any], cached: bool, run_id: str | None) -> MixResult:
    per_input = card["counts"]["per_input"]
    return MixResult(output=out, cached=cached, mlflow_run_id=run_id, samples=sum(per_input),
                     per_input=per_input, image_root=card.get("image_root"))


STAGE = Stage(name=NAME, config=MixConfig, result=MixResult, main=main, image="data",
              inputs=(Input("datasets", type=list),), outputs={"dataset": "Dataset"})

if __name__ == "__main__":
    sys.exit(STAGE.cli())
