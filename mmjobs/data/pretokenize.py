"""Pre-tokenize a canonical dataset into Parquet shards, in parallel, resumable.

`pretokenize(job)` streams `samples.jsonl` once, cuts it into shards of `shard_size` input rows
(shard i = rows [i*shard_size, (i+1)*shard_size)) and hands whole shards to `workers` processes
(forked from a fork server that preloads torch and transformers, each loading the processor
once; `workers=1` runs in-process). Only the shards in
flight are in memory, never the dataset.

**Resumable.** Each finished shard is written straight to the output location (local or S3),
then a marker `_shards/shard-NNNNN.json` with its stats, rejects, size and sha256. A re-run
with the same fingerprint skips every shard that has a marker, so a crash (OOM kill, preempted
node, SIGKILL) costs at most the shards in flight; the output is byte-identical to an
uninterrupted run because each shard depends only on its own rows. Shards go to the store
rather than a local work dir so a retry in a fresh pod resumes too.

**Committed.** When all shards exist, `rejects.jsonl`, `card.json` and `README.md` are written
and then `_MANIFEST.json` (from the markers' checksums, so S3 shards are not downloaded again);
before that the directory is incomplete and never read as an input (resume, card and
commit: `mmjobs.data.pretokenize_entry`).

**Fan-out.** `pretokenize(job, part=(k, n))` encodes only the shards `i` with `i % n == k`
and commits nothing: n such runs (the pipeline's CPU pods, `fan_out: n`) write disjoint shards
and markers into the same cache entry, then a run without `part` finds every marker and
commits. Each shard depends only on its own rows, so the entry is byte-identical to one
written by a single run.

Datasets of kind `sample` give one row per conversation; datasets of kind `preference` give
one row per pair, its chosen and rejected sequences side by side (the preference variant of
the shard schema, see `mmjobs.data.pretokenized`); datasets of kind `prompt` give one row per
prompt, rendered with the generation prompt and labelled nowhere (PPO/GRPO rollouts,
`encode_prompt`).

Row-level problems become rejects with a reason (`too_long: N tokens > max_length M`, ...),
so `input = written + rejected` always holds; problems with the model or the code raise.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path, PurePosixPath
from typing import Any

from mmjobs import storage
from mmjobs.data import pretokenized as fmt
from mmjobs.data.pretokenize_entry import (
    build_card,
    commit,
    finished_shards,
    marker_json,
    remove_leftovers,
)
from mmjobs.data.records import CARD_FILE as DATASET_CARD
from mmjobs.data.records import SAMPLES_FILE, RawRow, Reject, parse_record
from mmjobs.data.validate import normalize_reason
from mmjobs.logs import get_logger, progress

log = get_logger(__name__)
# Test hook: the process exits abruptly (like SIGKILL) after writing this many shards.
CRASH_ENV = "MMJOBS_PRETOKENIZE_CRASH_AFTER_SHARDS"


@dataclass(frozen=True)
class PretokenizeJob:
    """Everything a pre-tokenization run needs (all JSON-able, so workers can receive it)."""

    dataset: str  # committed canonical dataset URI
    model_dir: str  # local directory with the processor (and VQ weights for Chameleon)
    out: str  # output URI (usually {cache_root}/{fingerprint})
    fingerprint: str
    max_length: int
    shard_size: int
    workers: int = 1
    trust_remote_code: bool = False
    card_meta: dict[str, Any] = field(default_factory=dict)  # model id, fingerprints, ...
    conversation_format: str = "auto"  # mmjobs.data.conversation.FORMAT_NAMES
    truncate: bool = False  # cut text past max_length (LLaVA) instead of rejecting the row

    def encoder(self) -> Any:
        """The `SampleEncoder` for this job (loads the processor)."""
        from mmjobs.data.sample_encoder import SampleEncoder

        return SampleEncoder(self.model_dir, max_length=self.max_length,
                             trust_remote_code=self.trust_remote_code,
                             conversation_format=self.conversation_format,
                             truncate=self.truncate)


@dataclass
class _Context:
    """Per-process state: the job, where images live, the record kind, the encoder (loaded
    once)."""

    job: PretokenizeJob
    image_root: str
    kind: str = "sample"
    encoder: Any = None
    shards_done: int = 0


_WORKER: _Context | None = None


@dataclass(frozen=True)
class PretokenizeOutcome:
    """The committed card (None after a fan-out part: nothing is committed), the stats of
    the shards the run covered, and how many it wrote vs. reused from a crashed run."""

    card: dict[str, Any] | None
    shards_written: int
    shards_reused: int
    shards: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- entry point


def pretokenize(job: PretokenizeJob, *, force: bool = False,
                part: tuple[int, int] | None = None) -> PretokenizeOutcome:
    """Write the pre-tokenized, committed dataset for `job` (or one fan-out part of it).

    Workers start from a fresh process (the fork server), so a script calling this with
    `workers > 1` needs the usual `if __name__ == "__main__":` guard (the stage CLI has it).

    Args:
        job: inputs, output URI, options.
        force: ignore finished shards of an earlier run and start over (a part: its own).
        part: `(k, n)`: encode only the shards `i % n == k`, touch no other part's files and
            commit nothing (see the module docstring).

    Raises:
        storage.IncompleteDirectoryError: the dataset has no manifest.
        ValueError: the dataset is not a `sample`, `preference` or `prompt` dataset, or the
            model has no chat template.
        RuntimeError: a worker process died (the finished shards are kept; re-run to resume).
    """
    storage.read_manifest(job.dataset)  # an uncommitted dataset is incomplete: never read it
    dataset_card = json.loads(storage.read_text(storage.join(job.dataset, DATASET_CARD)))
    kind = dataset_card.get("kind", "sample")
    if kind not in fmt.SCHEMAS:
        raise ValueError(f"{job.dataset}: pretokenize supports kind=sample, preference and "
                         f"prompt datasets, not {kind!r}")
    ctx = _Context(job, resolve_image_root(job.dataset, dataset_card), kind)
    # Loading the processor here first fails fast on a bad model, before any worker starts.
    ctx.encoder = job.encoder()
    storage.delete(storage.join(job.out, storage.MANIFEST_NAME))
    mine = _part_filter(part)
    finished = {} if force else finished_shards(job)
    finished = {i: s for i, s in finished.items() if mine(i)}
    remove_leftovers(job.out, finished, mine, whole=part is None)
    if finished:
        log.info("%s: resuming; %d shards already done", job.out, len(finished))

    plan = _ShardPlan(job, skip=set(finished), only=mine)
    stats = dict(finished)
    for shard in progress(_run_shards(ctx, plan), desc="pretokenize shards"):
        stats[shard["shard"]] = shard
    if part is not None:  # the committing run (no part) writes the card and manifest
        return PretokenizeOutcome(None, len(stats) - len(finished), len(finished),
                                  [stats[i] for i in sorted(stats)])
    missing = set(range(plan.num_shards)) - set(stats)
    if missing:  # cannot happen unless markers vanished mid-run
        raise RuntimeError(f"{job.out}: shards {sorted(missing)[:5]} were not written")
    card = build_card(job, [stats[i] for i in range(plan.num_shards)], ctx.encoder.describe(),
                      kind=kind)
    commit(job, [stats[i] for i in range(plan.num_shards)], card)
    return PretokenizeOutcome(card, len(stats) - len(finished), len(finished),
                              [stats[i] for i in range(plan.num_shards)])


def _part_filter(part: tuple[int, int] | None) -> Any:
    """Which shard indexes a run owns: all, or those of fan-out part `(k, n)`."""
    if part is None:
        return lambda index: True
    k, n = part
    if not 0 <= k < n:
        raise ValueError(f"part {k} of {n}: the part index must be in 0..{n - 1}")
    return lambda index: index % n == k


def resolve_image_root(dataset: str, card: dict[str, Any]) -> str:
    """The dataset card's `image_root`: a URI, or a path relative to the dataset directory."""
    root = card.get("image_root")
    if not root:
        return dataset
    if storage.is_s3(root) or root.startswith("file://") or os.path.isabs(root):
        return root
    return storage.join(dataset, root)


# --------------------------------------------------------------------------- planning


class _ShardPlan:
    """Streams samples.jsonl once, yielding `(index, rows)` for shards not yet done."""

    def __init__(self, job: PretokenizeJob, skip: set[int], only: Any = None) -> None:
        self.job, self.skip, self.num_shards = job, skip, 0
        self.only = only or (lambda index: True)  # a fan-out part's shards

    def __iter__(self) -> Iterator[tuple[int, list[RawRow]]]:
        from mmjobs.data.records import iter_jsonl

        rows: list[RawRow] = []
        index = 0
        for row in iter_jsonl(storage.join(self.job.dataset, SAMPLES_FILE)):
            rows.append(row)
            if len(rows) == self.job.shard_size:
                if index not in self.skip and self.only(index):
                    yield index, rows
                index, rows = index + 1, []
        if rows:
            if index not in self.skip and self.only(index):
                yield index, rows
            index += 1
        self.num_shards = index


def _run_shards(ctx: _Context, plan: _ShardPlan) -> Iterator[dict[str, Any]]:
    """Encode the planned shards in-process or in a process pool; yield their stats."""
    if ctx.job.workers <= 1:
        for index, rows in plan:
            yield _encode_shard(ctx, index, rows)
        return
    limit = 2 * ctx.job.workers  # shards in flight, which bounds memory
    try:
        with ProcessPoolExecutor(ctx.job.workers, mp_context=_worker_context(ctx),
                                 initializer=_init_worker,
                                 initargs=(ctx.job, ctx.image_root, ctx.kind,
                                           dict(os.environ))) as pool:
            pending: set[Future] = set()
            for index, rows in plan:
                if len(pending) >= limit:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
                pending.add(pool.submit(_encode_shard_in_worker, index, rows))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
    except BrokenProcessPool as e:
        raise RuntimeError(f"{ctx.job.out}: a pretokenize worker process died (killed, or out "
                           "of memory: lower `workers` or `shard_size`); finished shards are "
                           "kept, re-run to resume") from e


def _worker_context(ctx: _Context) -> Any:
    """Workers are forked from a fork server that has imported, once, what a worker needs
    before its first shard: torch, this module and the transformers modules of the loaded
    processor (about 4 s per worker when each imports them itself, as spawned workers do).
    Not `fork`: the parent's torch and tokenizer threads would be copied mid-state; the fork
    server is a fresh single-threaded process. It lives as long as this process and keeps the
    environment it started with, so `_init_worker` installs the caller's current one."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    processor = ctx.encoder.processor
    classes = [type(processor), type(getattr(processor, "image_processor", None)),
               type(getattr(processor, "tokenizer", None))]
    # Never code shipped with a model (trust_remote_code): workers import it themselves.
    own = [c.__module__ for c in classes if c.__module__.startswith("transformers.")]
    server = get_context("forkserver")
    server.set_forkserver_preload(list(dict.fromkeys([*_PRELOAD, *own])))
    return server


# Imported by the fork server (see _worker_context); a missing one is skipped by Python.
_PRELOAD = ("torch", "mmjobs.data.pretokenize", "mmjobs.data.sample_encoder",
            "transformers.processing_utils", "transformers.image_processing_utils",
            "transformers.tokenization_utils_fast", "pyarrow.parquet")


def _init_worker(job: PretokenizeJob, image_root: str, kind: str,
                 environ: dict[str, str]) -> None:
    global _WORKER
    import torch

    # The fork server's environment is the one it started with (the first pool of this
    # process); workers take the caller's current one (store endpoint, credentials).
    os.environ.clear()
    os.environ.update(environ)
    # Workers share the cores: one torch thread each avoids oversubscription.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = _Context(job, image_root, kind, job.encoder())


def _encode_shard_in_worker(index: int, rows: list[RawRow]) -> dict[str, Any]:
    if _WORKER is None:
        raise RuntimeError("pretokenize worker was not initialised")
    return _encode_shard(_WORKER, index, rows)


# --------------------------------------------------------------------------- one shard


def _encode_shard(ctx: _Context, index: int, rows: list[RawRow]) -> dict[str, Any]:
    """Encode one shard's rows, write the Parquet shard, then its marker; return the stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmjobs.data.sample_encoder import SampleRejected

    job = ctx.job
    encoded, rejects = [], []
    for row in rows:
        try:
            encoded.append(_encode_row(ctx, row))
        except SampleRejected as e:
            sample_id = row.data.get("id") if isinstance(row.data, dict) else None
            rejects.append(Reject(str(sample_id or row.locator), e.reason, row.locator).to_json())
    schema = fmt.SCHEMAS[ctx.kind]
    table = pa.Table.from_pydict({f.name: [_cell(e, f.name) for e in encoded]
                                  for f in schema}, schema=schema)
    with tempfile.TemporaryDirectory(prefix="mmjobs-shard-") as tmp:
        local = Path(tmp) / Path(fmt.shard_name(index)).name
        pq.write_table(table, local, compression="zstd")
        entry = storage.FileEntry(fmt.shard_name(index), local.stat().st_size,
                                  storage.sha256_file(local))
        storage.put_file(local, storage.join(job.out, entry.path))
    lengths = [e.length for e in encoded]
    stats = {
        "fingerprint": job.fingerprint, "shard": index, "file": entry.path, "size": entry.size,
        "sha256": entry.sha256, "rows_in": len(rows), "rows_written": len(encoded),
        "rejects": rejects, "tokens": sum(_tokens(e) for e in encoded),
        "label_tokens": sum(e.label_tokens for e in encoded),
        "image_tokens": sum(e.num_image_tokens for e in encoded),
        "images": sum(_images(e) for e in encoded), "max_length": max(lengths, default=0),
        "histogram": fmt.histogram_counts(lengths, fmt.histogram_edges(job.max_length)),
    }
    # The marker goes last: its presence means the shard is complete.
    marker = marker_json(stats)
    storage.write_text(storage.join(job.out, fmt.marker_name(index)), marker)
    ctx.shards_done += 1
    if os.environ.get(CRASH_ENV) and ctx.shards_done >= int(os.environ[CRASH_ENV]):
        os._exit(86)  # test hook: die like a killed process, without cleanup
    # Return exactly what a resumed run reads back, so both build byte-identical outputs.
    return json.loads(marker)


def _cell(encoded: Any, column: str) -> Any:
    """The shard cell of `column` for an encoded row (image bytes become Image cells)."""
    value = getattr(encoded, column)
    return fmt.image_cells(value) if column in fmt.IMAGE_COLUMNS else value


def _tokens(encoded: Any) -> int:
    """Tokens of a row: a sample's, or both sides of a pair."""
    if hasattr(encoded, "chosen_input_ids"):
        return len(encoded.chosen_input_ids) + len(encoded.rejected_input_ids)
    return encoded.length


def _images(encoded: Any) -> int:
    """Image files stored in a row (a pair's prompt and response images)."""
    return len(encoded.images) + len(getattr(encoded, "chosen_images", ())) + len(
        getattr(encoded, "rejected_images", ()))


def _encode_row(ctx: _Context, row: RawRow):
    from mmjobs.data.sample_encoder import SampleRejected

    if row.error:  # invalid UTF-8 or JSON: validate's codes for reader errors
        raise SampleRejected(*normalize_reason(row.error).split(": ", 1))
    try:
        record = parse_record(row.data, ctx.kind)
    except ValueError as e:
        raise SampleRejected("invalid_record", str(e)) from None
    if ctx.kind == "preference":
        return ctx.encoder.encode_preference(
            record, _read_images(ctx, record.images), _read_images(ctx, record.chosen_images),
            _read_images(ctx, record.rejected_images))
    if ctx.kind == "prompt":
        return encode_prompt(ctx.encoder, record, _read_images(ctx, record.images))
    return ctx.encoder.encode(record, _read_images(ctx, record.images))


def encode_prompt(encoder: Any, record: Any, images: list[bytes]) -> Any:
    """Encode a prompt-only record as the model sees it before answering: the conversation
    format's generation prompt, processed with its images (VQ codes written over the image
    positions for image-token models), labels all -100. Never truncated: a rollout continues
    from the prompt's end.

    Args:
        encoder: a `SampleEncoder`.
        record: a `PromptSample` (its last turn is the user's).
        images: the prompt's encoded images, in `<image>` order.

    Returns:
        An `EncodedSample` (the sample shard row layout).

    Raises:
        SampleRejected: wrong image count, undecodable image, a conversation the format
            cannot render, or longer than max_length.
    """
    from mmjobs.data.sample_encoder import (
        IGNORE_INDEX,
        EncodedSample,
        _open_image,
    )

    messages = [{"role": t.role, "content": t.content} for t in record.prompt]
    encoder.check_placeholders(messages, images)
    pil_images = [_open_image(b, i) for i, b in enumerate(images)]
    tokens = encoder.tokenize(record.id, encoder.render_prompt(messages), [], pil_images)
    return EncodedSample(id=record.id, input_ids=tokens.input_ids,
                         labels=[IGNORE_INDEX] * len(tokens.input_ids),
                         images=[] if encoder.vq is not None else list(images),
                         num_image_tokens=tokens.num_image_tokens)


def _read_images(ctx: _Context, paths: list[str]) -> list[bytes]:
    """The bytes of images under the image root (paths must stay inside it)."""
    from mmjobs.data.sample_encoder import SampleRejected

    images = []
    for path in paths:
        parts = PurePosixPath(path).parts
        if not path or PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path:
            raise SampleRejected("image_path_unsafe", f"{path!r} is not a relative path under "
                                 "the image root")
        try:
            images.append(storage.read_bytes(storage.join(ctx.image_root, path)))
        except storage.StoreNotFoundError:
            raise SampleRejected("image_missing", f"{path}: not found under "
                                 f"{ctx.image_root}") from None
    return images
