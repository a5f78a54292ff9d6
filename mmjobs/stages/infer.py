"""Stage `infer`: generate answers for a canonical dataset or a benchmark -> predictions JSONL.

    python -m mmjobs.stages.infer --set model=s3://runs/x/merge --set benchmark=chartqa \\
        --set benchmark_root=s3://data/ChartQA --set 'benchmark_options={"split": "test"}'
    python -m mmjobs.stages.infer --set model=s3://models/llava --set adapter=s3://runs/x/train \\
        --set dataset=s3://runs/x/prepare --set split=test

Prompts come from a committed canonical dataset (`sample` records: the conversation up to the
last assistant turn is the prompt, that turn's content the gold answer; `prompt` records as
they are) or from `mmjobs.eval.benchmarks.load_benchmark`. The committed output holds
`predictions.jsonl` (one row per prompt, in source order: `id`, `prompt`, `prediction`, then
`answers`/`gt` and the record's `meta` or the benchmark's `fields`, which `mmjobs score` reads)
and `infer.json` (counts, seconds, tokens/s).

`modalities: [text, image]` (image-token models such as Chameleon) lets answers contain images:
generation follows `mmjobs.eval.interleaved`, each generated image is written as a PNG under
`images/` next to `predictions.jsonl`, and rows gain `parts`, `output_images` and `images`
(schema in that module's docstring).

Resumable: answered rows are appended to `predictions.partial.jsonl` and flushed after every
batch (in the output directory; for s3:// outputs a local file uploaded every
`upload_every_seconds`, and when the stage fails or gets SIGTERM). A restarted stage with the
same model, source and generation settings keeps those rows and answers only the other ids;
settings that do not change a row (`batch_size`, `limit`, `split`) may change between runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field, model_validator

from mmjobs import storage
from mmjobs.data.conversation import FORMAT_HELP, ConversationFormatName
from mmjobs.logs import get_logger, progress
from mmjobs.stages.common import (
    StageConfig,
    StageResult,
    fingerprint,
    input_fingerprint,
    output_uri,
    reusable_output,
    stage_cli,
    stage_tracking,
    staged_output,
)

STAGE = "infer"
# Bump when rows or the output layout change: invalidates cached and partial outputs.
# 2: conversation formats (content-part templates no longer repeat the "\n" after an image).
VERSION = 2
PREDICTIONS_FILE = "predictions.jsonl"
PARTIAL_FILE = "predictions.partial.jsonl"
PARTIAL_META = "predictions.partial.json"
SUMMARY_FILE = "infer.json"
log = get_logger(__name__)
# Prompts whose images are loaded and handed to the generator together: enough for its length
# sorting to pay off, few enough that the decoded images of a window fit in memory.
_WINDOW_BATCHES = 8
# Fields that change no row: where output goes, how it is tracked, how fast it is made.
_NOT_IN_ROWS = {"experiment", "pipeline_run_id", "output", "recipe", "parent_run_id", "force",
                "model", "adapter", "dataset", "batch_size", "upload_every_seconds", "limit",
                "split"}  # model/adapter/dataset enter by content; limit/split pick rows only


class InferConfig(StageConfig):
    """Generate predictions for a canonical dataset or a benchmark with a (LoRA) model."""

    model: str = Field(description="Model URI: local dir, s3:// committed dir or hub id; the "
                       "base model when `adapter` is set.")
    adapter: str | None = Field(None, description="LoRA adapter dir, or a training output "
                                "holding final/adapter (local or s3://).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto: bfloat16 on GPUs that support it, else float32.")
    dataset: str | None = Field(None, description="Committed canonical dataset (sample or "
                                "prompt records). Give this or `benchmark`.")
    split: str | None = Field(None, description="Dataset only: keep records whose meta.split "
                              "equals this (e.g. test).")
    benchmark: str | None = Field(None, description="Benchmark name for "
                                  "mmjobs.eval.benchmarks.load_benchmark (e.g. chartqa).")
    benchmark_root: str | None = Field(None, description="The benchmark's files in their "
                                       "official layout (local or s3://). Not fingerprinted: "
                                       "set force=true after changing them in place.")
    benchmark_options: dict[str, Any] = Field(default_factory=dict,
                                              description="Loader options (see the loader).")
    limit: int | None = Field(None, ge=1, description="Answer only the first N prompts.")
    prompt_suffix: str = Field("", description="Appended to each prompt's last user turn, e.g. "
                               "a program-of-thought instruction.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch; higher is "
                            "faster until memory runs out.")
    max_new_tokens: int = Field(64, ge=1, description="Generation length cap per answer.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    num_beams: int = Field(1, ge=1, description="Beam search width; 1 is no beam search.")
    stop_strings: list[str] = Field(default_factory=list, description="Stop an answer at any "
                                    "of these; the answer is trimmed before it.")
    conversation_format: ConversationFormatName = Field(
        "auto", description="How prompts are rendered (as pretokenize rendered the training "
        "data): auto/template = the model's chat template; built-in formats for models "
        f"without one: {FORMAT_HELP}. A format adds its own stops (e.g. </s>).")
    seed: int = Field(0, description="Sampling seed, set at the start of every window of 8 "
                      "batches.")
    upload_every_seconds: float = Field(60.0, ge=0, description="s3:// outputs: upload the "
                                        "partial predictions at most this often (work since "
                                        "the last upload is redone after a kill).")
    modalities: list[Literal["text", "image"]] = Field(
        default_factory=lambda: ["text"], description="What answers may contain. [text, image]: "
        "image-token models (Chameleon) also generate images, saved as PNGs under images/ "
        "next to the predictions (see mmjobs.eval.interleaved).")
    max_output_images: int = Field(1, ge=1, description="modalities with image: images one "
                                   "answer may contain.")
    vq_decoder: str | None = Field(None, description="modalities with image: where the VQ "
                                   "image decoder weights are (model dir or .safetensors file); "
                                   "default the model. Set it to the base model for fully "
                                   "fine-tuned or merged models, which are saved without it.")

    @model_validator(mode="after")
    def _check_source(self) -> InferConfig:
        problems = []
        if (self.dataset is None) == (self.benchmark is None):
            problems.append("give exactly one of `dataset` (a canonical dataset URI) and "
                            "`benchmark` (a benchmark name)")
        if self.benchmark is not None and self.benchmark_root is None:
            problems.append(f"benchmark={self.benchmark!r} needs `benchmark_root`, the folder "
                            "holding its files")
        if self.dataset is not None and (self.benchmark_root or self.benchmark_options):
            problems.append("benchmark_root/benchmark_options apply to `benchmark` only; remove "
                            "them or use benchmark instead of dataset")
        if self.benchmark is not None and self.split is not None:
            problems.append("`split` filters datasets; for a benchmark use its own option, "
                            "e.g. benchmark_options.split")
        if "text" not in self.modalities or len(set(self.modalities)) != len(self.modalities):
            problems.append(f"modalities {self.modalities}: list text, and image for answers "
                            "that may contain images, each once")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def interleaved(self) -> bool:
        """Answers may contain images (`modalities` lists image)."""
        return "image" in self.modalities


class InferResult(StageResult):
    """Where the predictions are and how they were made."""

    predictions: str
    rows: int
    answered: int
    resumed: int
    seconds: float
    tokens_per_second: float | None


@dataclass
class PromptItem:
    """One prompt to answer: `prompt` is a user text or turns; `images` are URIs."""

    id: str
    prompt: str | list[dict[str, str]]
    images: list[str]
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn (the `prompt` column of the predictions)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


def main(cfg: InferConfig) -> InferResult:
    """Run the stage; see the module docstring."""
    out = output_uri(cfg, STAGE)
    row_fp = _rows_fingerprint(cfg)
    fp = fingerprint(STAGE, row_fp, cfg.limit, cfg.split)
    source = cfg.dataset or f"benchmark {cfg.benchmark} at {cfg.benchmark_root}"
    with stage_tracking(cfg, STAGE, tags={"source": source}) as run:
        if reusable_output(out, fp, cfg.force) is not None:
            summary = json.loads(storage.read_text(storage.join(out, SUMMARY_FILE)))
            run.set_tags({"cached": "true"})
            return _result(out, summary, cached=True, run_id=run.run_id)
        # An older output made from other inputs must not look current while this one runs.
        storage.delete(storage.join(out, storage.MANIFEST_NAME))
        start = time.monotonic()
        partial = PartialPredictions(out, row_fp, upload_every=cfg.upload_every_seconds)
        try:
            with _sigterm_raises():
                rows, order, stats = _answer_all(cfg, partial)
        except BaseException:
            partial.close(upload=True)  # keep what was answered for the restart
            raise
        partial.close(upload=False)
        summary = {
            "rows": len(order), "answered": stats["answered"], "resumed": stats["resumed"],
            "seconds": round(time.monotonic() - start, 3),
            "generate_seconds": round(stats["seconds"], 3), "new_tokens": stats["new_tokens"],
            "tokens_per_second": _rate(stats["new_tokens"], stats["seconds"]),
            "samples_per_second": _rate(stats["answered"], stats["seconds"]),
            "mean_new_tokens": _rate(stats["new_tokens"], stats["answered"]),
            "model": cfg.model, "adapter": cfg.adapter, "source": source,
        }
        with staged_output(out, fp, meta={"stage": STAGE, "rows": len(order)}) as scratch:
            with open(scratch / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
                for item_id in order:
                    f.write(json.dumps(rows[item_id], ensure_ascii=False) + "\n")
            if cfg.interleaved:  # the PNGs written next to the rows go into the commit
                from mmjobs.eval.interleaved import copy_output_images

                summary["output_images"] = copy_output_images([rows[i] for i in order], out,
                                                              scratch)
            (scratch / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
            run.log_artifact(scratch / SUMMARY_FILE)
        partial.discard()  # after the commit: a crash before it still has the rows
        run.log_metrics({k: float(v) for k, v in summary.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)})
        log.info("%s: %d predictions (%d answered now, %d resumed) -> %s", STAGE, len(order),
                 stats["answered"], stats["resumed"], out)
        return _result(out, summary, cached=False, run_id=run.run_id)


def _answer_all(cfg: InferConfig, partial: PartialPredictions
                ) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """Answer every prompt not in the partial file; returns (rows by id, ids in source order,
    stats)."""
    rows = partial.load()
    resumed_ids = set(rows)
    order: list[str] = []
    stats: dict[str, Any] = {"answered": 0, "new_tokens": 0, "seconds": 0.0}
    generator = None
    window: list[PromptItem] = []

    def run_window() -> Iterator[tuple[dict[str, Any], bool]]:
        nonlocal generator
        if generator is None:  # only now: a fully resumed run never loads the model
            generator = _generator(cfg)
        yield from _answer_window(generator, window, stats,
                                  image_out=output_uri(cfg, STAGE) if cfg.interleaved else None)

    def todo() -> Iterator[tuple[dict[str, Any], bool]]:
        seen: set[str] = set()
        for item in iter_items(cfg):
            if item.id in seen:
                raise ValueError(f"{STAGE}: prompt id {item.id!r} occurs twice in the source; "
                                 "ids must be unique (rows are resumed by id)")
            seen.add(item.id)
            order.append(item.id)
            if item.id in resumed_ids:
                continue
            window.append(item)
            if len(window) >= _WINDOW_BATCHES * cfg.batch_size:
                yield from run_window()
                window.clear()
        if window:
            yield from run_window()

    for row, end_of_batch in progress(todo(), desc=STAGE):
        rows[row["id"]] = row
        partial.add(row)
        if end_of_batch:
            partial.flush()
    stats["resumed"] = len(resumed_ids & set(order))
    return rows, order, stats


def _answer_window(generator: Any, items: list[PromptItem], stats: dict[str, Any], *,
                   image_out: str | None = None) -> Iterator[tuple[dict[str, Any], bool]]:
    """Rows for `items`, batch by batch: `(row, is the batch's last row)`; interleaved answers
    get their images written as PNGs under `image_out` (and their parts in the row)."""
    from mmjobs.eval.generate import PromptInput, load_image

    prompts = [PromptInput(item.prompt, [load_image(uri) for uri in item.images])
               for item in items]
    start = time.monotonic()
    for out in generator.generate_batches(prompts):
        stats["seconds"] += time.monotonic() - start
        stats["answered"] += len(out.indices)
        stats["new_tokens"] += sum(out.new_tokens)
        for k, (i, text) in enumerate(zip(out.indices, out.texts, strict=True)):
            item = items[i]
            row = {"id": item.id, "prompt": item.text, "prediction": text}
            if image_out is not None:
                from mmjobs.eval.interleaved import output_fields

                row.update(output_fields(image_out, item.id, item.images, out.parts[k],
                                         out.incomplete_images[k]))
            row.update((k, v) for k, v in item.fields.items() if k not in row)
            yield row, k == len(out.indices) - 1
        start = time.monotonic()


def _generator(cfg: InferConfig) -> Any:
    from mmjobs.eval.generate import Generator, load_for_inference

    loaded = load_for_inference(cfg.model, cfg.adapter, trust_remote_code=cfg.trust_remote_code,
                                dtype=cfg.dtype, conversation_format=cfg.conversation_format)
    options = dict(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                   do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, num_beams=cfg.num_beams, stop_strings=cfg.stop_strings,
                   seed=cfg.seed)
    if cfg.interleaved:
        from mmjobs.eval.interleaved import InterleavedGenerator

        return InterleavedGenerator(loaded, vq_decoder=cfg.vq_decoder,
                                    max_images=cfg.max_output_images, **options)
    return Generator(loaded, **options)


# --------------------------------------------------------------------------- prompt sources


def iter_items(cfg: InferConfig) -> Iterator[PromptItem]:
    """The prompts to answer, in source order (split filter, suffix and limit applied)."""
    if cfg.dataset is not None:
        items = dataset_items(cfg.dataset, split=cfg.split)
    else:
        from mmjobs.eval.benchmarks import load_benchmark

        root = cfg.benchmark_root or ""
        items = (PromptItem(b.id, b.prompt, list(b.images), dict(b.fields))
                 for b in load_benchmark(cfg.benchmark or "", root, **cfg.benchmark_options))
    for n, item in enumerate(items):
        if cfg.limit is not None and n >= cfg.limit:
            return
        if cfg.prompt_suffix:
            item.prompt = _with_suffix(item.prompt, cfg.prompt_suffix)
        yield item


def dataset_items(dataset: str, *, split: str | None = None) -> Iterator[PromptItem]:
    """Prompts from a committed canonical dataset of `sample` or `prompt` records.

    A sample's prompt is its conversation up to the last assistant turn, whose content is the
    gold answer: `gt`, and `answers` unless `meta.answers` gives the accepted answers. Every
    `meta` field is copied into the row (split, question_type, ...).

    Raises:
        storage.IncompleteDirectoryError: `dataset` is not committed.
        ValueError: a preference dataset, or a record without a user turn to answer.
    """
    from mmjobs.data.pretokenize import resolve_image_root
    from mmjobs.data.records import CARD_FILE, IMAGE_TOKEN, SAMPLES_FILE, iter_records

    storage.read_manifest(dataset)  # an uncommitted dataset is never an input
    card = json.loads(storage.read_text(storage.join(dataset, CARD_FILE)))
    kind = card.get("kind", "sample")
    if kind not in ("sample", "prompt"):
        raise ValueError(f"{dataset}: a {kind} dataset; infer answers sample or prompt datasets")
    image_root = resolve_image_root(dataset, card)
    for record in iter_records(storage.join(dataset, SAMPLES_FILE), kind):
        if split is not None and record.meta.get("split") != split:
            continue
        turns = [t.model_dump() for t in (record.conversations if kind == "sample"
                                          else record.prompt)]
        gold = None
        assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        if kind == "sample" and assistant:
            gold = turns[assistant[-1]]["content"]
            turns = turns[:assistant[-1]]
        if not turns or turns[-1]["role"] != "user":
            raise ValueError(f"{dataset}: record {record.id}: no user turn to answer before "
                             "the last assistant turn")
        used = sum(t["content"].count(IMAGE_TOKEN) for t in turns)  # not the answer's images
        fields = dict(record.meta)
        if gold is not None:
            fields = {"answers": record.meta.get("answers") or [gold], "gt": gold, **fields}
        yield PromptItem(record.id, turns, [storage.join(image_root, p)
                                            for p in record.images[:used]], fields)


def _with_suffix(prompt: str | list[dict[str, str]], suffix: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        return prompt + suffix
    last = {**prompt[-1], "content": prompt[-1]["content"] + suffix}
    return [*prompt[:-1], last]


# --------------------------------------------------------------------------- resumability


class PartialPredictions:
    """Rows answered so far, appended to a JSONL that survives a crash.

    Local outputs keep it at `{output}/predictions.partial.jsonl`, flushed (and fsynced) after
    every batch. s3:// outputs keep it in a local temporary file, uploaded to the same key at
    most every `upload_every` seconds. `predictions.partial.json` records the fingerprint of
    the settings that shape rows; a partial file made with other settings is discarded.
    """

    def __init__(self, out: str, row_fp: str, *, upload_every: float) -> None:
        self.uri = storage.join(out, PARTIAL_FILE)
        self.meta_uri = storage.join(out, PARTIAL_META)
        self.row_fp = row_fp
        self.upload_every = upload_every
        self.remote = storage.is_s3(out)
        self._tmp = Path(tempfile.mkdtemp(prefix="mmjobs-infer-", dir=os.environ.get(
            "MMJOBS_TMP"))) if self.remote else None
        self.path = self._tmp / PARTIAL_FILE if self._tmp else Path(storage.parse(self.uri).key)
        self._f: IO[str] | None = None
        self._dirty = False
        self._uploaded = time.monotonic()

    def load(self) -> dict[str, dict[str, Any]]:
        """Rows of an earlier run with the same settings (by id); opens the file to append."""
        rows: dict[str, dict[str, Any]] = {}
        if self._matches():
            if self.remote and storage.exists(self.uri):
                storage.get_file(self.uri, self.path)
            if self.path.is_file():
                rows = self._read()
        else:
            self.discard()
        # Rewritten whole: a line cut by a kill would otherwise swallow the next row appended.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values())
        storage.write_text(self.meta_uri, json.dumps({"fingerprint": self.row_fp,
                                                      "version": VERSION}))
        if rows:
            log.info("%s: resuming with %d answered rows from %s", STAGE, len(rows), self.uri)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        return rows

    def _matches(self) -> bool:
        try:
            meta = json.loads(storage.read_text(self.meta_uri))
        except (storage.StoreNotFoundError, ValueError):
            return False
        if meta.get("fingerprint") != self.row_fp:
            log.warning("%s: partial predictions at %s were made with other settings; starting "
                        "over", STAGE, self.uri)
            return False
        return True

    def _read(self) -> dict[str, dict[str, Any]]:
        rows = {}
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                log.warning("%s: dropping a damaged partial row (cut off by a kill?)", STAGE)
        return rows

    def add(self, row: dict[str, Any]) -> None:
        """Append one row (buffered until `flush`)."""
        if self._f is None:
            raise RuntimeError("PartialPredictions.add before load")
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._dirty = True

    def flush(self) -> None:
        """Make the rows durable: on disk now; in S3 if `upload_every` has passed."""
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        if self.remote and time.monotonic() - self._uploaded >= self.upload_every:
            self.upload()

    def upload(self) -> None:
        """Copy the local partial file to S3 (no-op for local outputs or without new rows)."""
        if self.remote and self._dirty and self.path.is_file():
            storage.put_file(self.path, self.uri)
            self._dirty = False
            self._uploaded = time.monotonic()

    def close(self, *, upload: bool) -> None:
        """Flush, optionally upload, and remove the local temporary copy of an S3 partial."""
        if self._f is not None:
            self._f.close()
            self._f = None
            if upload:
                try:
                    self.upload()
                except storage.StoreError as e:  # the original failure matters more
                    log.warning("%s: could not upload partial predictions: %s", STAGE, e)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def discard(self) -> None:
        """Delete the partial file and its fingerprint (local and remote)."""
        storage.delete(self.uri)
        storage.delete(self.meta_uri)
        if not self.remote:
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- helpers


def _rows_fingerprint(cfg: InferConfig) -> str:
    """Hash of everything that shapes a row: model + adapter contents, source, settings."""
    from mmjobs.models.builder import dir_fingerprint
    from mmjobs.train.merge import locate_adapter

    adapter = dir_fingerprint(locate_adapter(cfg.adapter)) if cfg.adapter else None
    dataset = input_fingerprint(cfg.dataset) if cfg.dataset else None
    # Text-only runs hash as before the interleaved settings existed (their rows are the same).
    image = ({"vq_decoder"} if cfg.interleaved else
             {"modalities", "max_output_images", "vq_decoder"})
    decoder = []
    if cfg.interleaved and cfg.vq_decoder:
        decoder = [input_fingerprint(cfg.vq_decoder) if cfg.vq_decoder.endswith(".safetensors")
                   else _model_fingerprint(cfg.vq_decoder)]
    return fingerprint(STAGE, VERSION, cfg.model_dump(exclude=_NOT_IN_ROWS | image),
                       _model_fingerprint(cfg.model), adapter, dataset, *decoder)


def _model_fingerprint(model: str) -> str:
    """Contents of a local/s3 model dir; a hub id stands for itself (pin it with @revision)."""
    from mmjobs.models.builder import dir_fingerprint

    try:
        return dir_fingerprint(model)
    except storage.StoreNotFoundError:
        if storage.is_s3(model):
            raise
        return model


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (Kubernetes evicting or preempting the pod) into `SystemExit`, so the rows
    answered so far are uploaded within the grace period; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rate(amount: float, per: float) -> float | None:
    return round(amount / per, 3) if per > 0 else None


def _result(out: str, summary: dict[str, Any], *, cached: bool,
            run_id: str | None) -> InferResult:
    return InferResult(output=out, cached=cached, mlflow_run_id=run_id,
                       predictions=storage.join(out, PREDICTIONS_FILE), rows=summary["rows"],
                       answered=summary["answered"], resumed=summary["resumed"],
                       seconds=summary["seconds"], tokens_per_second=summary["tokens_per_second"])


def cli(argv: list[str] | None = None) -> int:
    """`python -m mmjobs.stages.infer` / `mmjobs stage infer` (the image entrypoint)."""
    return stage_cli(STAGE, InferConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
