"""Answer prompts into predictions rows, resumably.

`answer_all` runs a generator over `PromptItem`s window by window and keeps every answered row
in a `PartialPredictions` file that survives a crash: `predictions.partial.jsonl` in the
output folder, appended and fsynced after every batch (for `s3://` outputs a local file
uploaded every `upload_every` seconds, and when the run fails or gets SIGTERM). A restart with
the same row-shaping settings (`predictions.partial.json` records their fingerprint) keeps
those rows and answers only the other ids. Rows: `id`, `prompt`, `prediction`, then the
prompt's own fields (`answers`/`gt`, the record's `meta` or the benchmark's `fields`);
interleaved answers add `mmjobs.eval.interleaved.output_fields`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from mmjobs import storage
from mmjobs.data.json_rows import MalformedInputError, iter_jsonl
from mmjobs.eval.prompts import PromptItem
from mmjobs.layout import PREDICTIONS_FILE
from mmjobs.logs import get_logger, progress

log = get_logger(__name__)
PARTIAL_FILE = "predictions.partial.jsonl"
PARTIAL_META = "predictions.partial.json"


def answer_all(items: Iterable[PromptItem], partial: PartialPredictions,
               make_generator: Callable[[], Any], *, window_size: int,
               image_out: str | None = None, desc: str = "infer"
               ) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """Answer every prompt of `items` not in the partial file, `window_size` prompts at a time
    (the generator, made by `make_generator` when first needed, sorts each window by length).

    Interleaved answers get their images written as PNGs under `image_out`.

    Returns:
        (rows by id, ids in source order, stats: answered, resumed, new_tokens, seconds).

    Raises:
        ValueError: an id occurs twice (rows are resumed by id).
    """
    rows = partial.load()
    resumed_ids = set(rows)
    order: list[str] = []
    stats: dict[str, Any] = {"answered": 0, "new_tokens": 0, "seconds": 0.0}
    generator = None
    window: list[PromptItem] = []

    def run_window() -> Iterator[tuple[dict[str, Any], bool]]:
        nonlocal generator
        if generator is None:  # only now: a fully resumed run never loads the model
            generator = make_generator()
        yield from _answer_window(generator, window, stats, image_out=image_out)

    def todo() -> Iterator[tuple[dict[str, Any], bool]]:
        seen: set[str] = set()
        for item in items:
            if item.id in seen:
                raise ValueError(f"{desc}: prompt id {item.id!r} occurs twice in the source; "
                                 "ids must be unique (rows are resumed by id)")
            seen.add(item.id)
            order.append(item.id)
            if item.id in resumed_ids:
                continue
            window.append(item)
            if len(window) >= window_size:
                yield from run_window()
                window.clear()
        if window:
            yield from run_window()

    for row, end_of_batch in progress(todo(), desc=desc):
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

    min_edge = getattr(generator, "image_min_edge", None)  # None: a server gets them whole
    prompts = [PromptInput(item.prompt, [load_image(uri, min_edge) for uri in item.images])
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


def run_summary(order: list[str], stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The numbers of a run (`answer_all`'s stats over `seconds` in all): rows, answered and
    resumed counts, times, new tokens and rates (None where nothing was generated)."""

    def rate(amount: float, per: float) -> float | None:
        return round(amount / per, 3) if per > 0 else None

    return {"rows": len(order), "answered": stats["answered"], "resumed": stats["resumed"],
            "seconds": round(seconds, 3), "generate_seconds": round(stats["seconds"], 3),
            "new_tokens": stats["new_tokens"],
            "tokens_per_second": rate(stats["new_tokens"], stats["seconds"]),
            "samples_per_second": rate(stats["answered"], stats["seconds"]),
            "mean_new_tokens": rate(stats["new_tokens"], stats["answered"])}


def write_predictions(folder: Path, rows: dict[str, dict[str, Any]], order: list[str], *,
                      images_from: str | None = None) -> int | None:
    """Write `predictions.jsonl` (rows in source `order`) into `folder`; with `images_from`
    (interleaved answers) also copy the PNGs written there for these rows, returning how many."""
    with open(folder / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        for item_id in order:
            f.write(json.dumps(rows[item_id], ensure_ascii=False) + "\n")
    if images_from is None:
        return None
    from mmjobs.eval.interleaved import copy_output_images

    return copy_output_images([rows[i] for i in order], images_from, folder)


class PartialPredictions:
    """Rows answered so far, appended to a JSONL that survives a crash.

    Local outputs keep it at `{output}/predictions.partial.jsonl`, flushed (and fsynced) after
    every batch. s3:// outputs keep it in a local temporary file, uploaded to the same key at
    most every `upload_every` seconds. `predictions.partial.json` records the fingerprint of
    the settings that shape rows; a partial file made with other settings is discarded.
    """

    def __init__(self, out: str, row_fp: str, *, upload_every: float, version: int = 1,
                 name: str = "infer") -> None:
        self.uri = storage.join(out, PARTIAL_FILE)
        self.meta_uri = storage.join(out, PARTIAL_META)
        self.row_fp, self.version, self.name = row_fp, version, name
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
                                                      "version": self.version}))
        if rows:
            log.info("%s: resuming with %d answered rows from %s", self.name, len(rows), self.uri)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        return rows

    def _matches(self) -> bool:
        try:
            meta = json.loads(storage.read_text(self.meta_uri))
        except (storage.StoreNotFoundError, ValueError):
            return False
        if meta.get("fingerprint") != self.row_fp:
            log.warning("%s: partial predictions at %s were made with other settings; starting "
                        "over", self.name, self.uri)
            return False
        return True

    def _read(self) -> dict[str, dict[str, Any]]:
        rows = {}
        try:
            for raw in iter_jsonl(self.path):
                if isinstance(raw.data, dict) and "id" in raw.data:  # a NaN in a field is fine
                    rows[raw.data["id"]] = raw.data
                else:
                    log.warning("%s: dropping a damaged partial row (%s)", self.name, raw.locator)
        except MalformedInputError:  # the last line, cut off by a kill
            log.warning("%s: dropping a damaged partial row (cut off by a kill?)", self.name)
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
                    log.warning("%s: could not upload partial predictions: %s", self.name, e)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def discard(self) -> None:
        """Delete the partial file and its fingerprint (local and remote)."""
        storage.delete(self.uri)
        storage.delete(self.meta_uri)
        if not self.remote:
            self.path.unlink(missing_ok=True)
