"""Validation with quarantine: every canonical record is accepted or becomes a `Reject`.

`Validator` checks what converters do not: conversation structure, `<image>` placeholders (as
many as images, and only in user turns unless the model generates images), duplicate ids
(after Unicode NFC normalisation), and that every image is a safe path to a complete,
decodable, not-too-large image that converts to 8-bit RGB, under the dataset's image root (a
local directory or an `s3://` prefix). Reader errors (`RawRow.error`, e.g. invalid UTF-8, a
NaN) and converter rejects pass through with a reason code, so `rows = accepted + rejected`
always holds.

Every reason is `"<code>: <detail>"` with a code from `REASONS` (stable: dashboards and the
MLflow metrics `reject.<code>` use them); `reason(code, detail)` builds one. Pretokenize uses
`TOO_LONG` from here so the whole pipeline shares one vocabulary. Rejects made here have
`source="validate"`; converter rejects keep their own `source` (the input file).

Example::

    v = Validator("s3://bucket/charts", kind="sample")
    for item in v.run(converter(ctx)):        # images of a batch are checked in parallel
        (samples if not isinstance(item, Reject) else rejects).write(item)
    v.stats.by_reason                         # Counter({"image_missing": 3, ...})
"""

from __future__ import annotations

import io
import os
import re
import threading
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from mmjobs import storage
from mmjobs.data.images import check_convertible
from mmjobs.data.records import (
    IMAGE_TOKEN,
    Kind,
    PreferenceSample,
    RawRow,
    Record,
    Reject,
    Sample,
    Turn,
    parse_record,
)

REASONS: dict[str, str] = {
    "image_missing": "an image does not exist under the image root",
    "image_empty": "an image file is 0 bytes",
    "image_truncated": "an image file ends early (interrupted download or copy)",
    "image_corrupt": "an image file is not a decodable image",
    "image_too_large": "an image has more pixels than max_image_pixels (decompression bomb)",
    "image_path_unsafe": "an image path is absolute, has '..' or resolves outside the root",
    "image_unsupported_mode": "an image's samples have no defined 8-bit scale (32-bit float, "
                              "or integers beyond 16 bits)",
    "placeholder_mismatch": "the number of <image> placeholders differs from the images",
    "placeholder_in_non_user_turn": "<image> in a system turn, or in an assistant turn of a "
                                    "dataset whose model does not generate images",
    "empty_conversation": "a record has no turns (or only a system turn)",
    "non_alternating": "turns do not alternate user/assistant after an optional system turn",
    "empty_assistant": "an assistant turn or response is empty",
    "duplicate_id": "a record id was already used by an earlier row (compared after Unicode "
                    "NFC normalisation)",
    "invalid_utf8": "an input line is not valid UTF-8",
    "invalid_json": "an input line or item is not valid JSON",
    "invalid_record": "a row is not a valid canonical record",
    "too_long": "a sample has more tokens than max_length (checked by pretokenize)",
    "format_mismatch": "a conversation the conversation format cannot render (e.g. plain "
                       "takes one image and a caption; checked by pretokenize)",
    "invalid_row": "the converter could not convert a row of the source format",
}
TOO_LONG = "too_long"
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
_CODE = re.compile(r"^([a-z][a-z0-9_]*):\s")
# Reader / parse_record messages without a code, mapped to one (prefix -> code).
_KNOWN_PREFIXES = {"invalid UTF-8": "invalid_utf8", "invalid JSON": "invalid_json",
                   "not a canonical": "invalid_record"}
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# Image.open is the only place PIL warns about decompression bombs; catch_warnings changes
# process-global state, so it runs under a lock (opening reads only the header: cheap).
_OPEN_LOCK = threading.Lock()


def reason(code: str, detail: str) -> str:
    """A reject reason `"<code>: <detail>"`; `code` must be one of `REASONS`."""
    if code not in REASONS:
        raise ValueError(f"unknown reject reason code {code!r}; add it to REASONS in {__name__}")
    return f"{code}: {detail}"


def reason_code(text: str) -> str:
    """The code of a reason string (`"image_missing: ..."` -> `"image_missing"`).

    Reasons without a code count as `invalid_row` (what `normalize_reason` would prefix).
    """
    match = _CODE.match(text)
    return match.group(1) if match else reason_code(normalize_reason(text))


def normalize_reason(text: str) -> str:
    """Give a reason without a code one: reader errors get theirs, converters' free text
    (`"missing question"`) becomes `invalid_row: missing question`."""
    if _CODE.match(text):
        return text
    for prefix, code in _KNOWN_PREFIXES.items():
        if text.startswith(prefix):
            return f"{code}: {text}"
    return f"invalid_row: {text}"


def reject_raw_row(row: RawRow, source: str = "") -> Reject:
    """The `Reject` for a reader row that failed to parse (`row.error` set)."""
    return Reject(row.locator, normalize_reason(row.error or "unreadable row"), source)


@dataclass
class ValidationStats:
    """Counts so far; `rows == accepted + rejected`."""

    rows: int = 0
    accepted: int = 0
    rejected: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)


class Validator:
    """Validates a stream of records for one dataset (keeps state: seen ids, checked images).

    Args:
        image_root: URI image paths are relative to (local dir or s3:// prefix); None if the
            dataset has no images (a record with images is then rejected).
        kind: record kind the converter yields (`sample`, `preference`, `prompt`).
        max_image_pixels: reject images whose header claims more pixels (checked before
            decoding). PIL itself refuses images over 2 x `PIL.Image.MAX_IMAGE_PIXELS`
            (~179M) whatever this says; that is reported as `image_too_large` too.
        check_images: open and decode images. Off: only path safety is checked, plus
            existence and size for local roots (a stat each; S3 would need a request each).
        workers: threads checking images in `run` (I/O and PIL decoding release the GIL).
        images_in_responses: allow `<image>` in assistant turns of samples (a model that
            generates images, e.g. Chameleon trained on align-anything-ti2ti). Off, such a
            sample is rejected: for a LLaVA-style model the image would be a training target.
    """

    def __init__(self, image_root: str | os.PathLike | None, *, kind: Kind = "sample",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, check_images: bool = True,
                 workers: int = 8, images_in_responses: bool = False) -> None:
        self.root = None if image_root is None else storage.parse(image_root)
        self._root_real = Path(self.root.key).resolve() if self.root and not self._s3 else None
        self.kind = kind
        self.max_image_pixels = max_image_pixels
        self.check_images = check_images
        self.workers = max(1, workers)
        self.images_in_responses = images_in_responses
        self.stats = ValidationStats()
        self._first_row: dict[str, tuple[int, str]] = {}  # NFC id -> (row, id as first seen)
        self._images: dict[str, tuple[str, str] | None] = {}  # path -> (code, detail) or OK

    @property
    def _s3(self) -> bool:
        return self.root is not None and self.root.scheme == "s3"

    # -- public ------------------------------------------------------------------------------
    def run(self, items: Iterable[Any], batch_size: int = 256) -> Iterator[Record | Reject]:
        """`check` every item, in order; each batch's new images are checked in parallel."""
        batch: list[Any] = []
        with ThreadPoolExecutor(self.workers, thread_name_prefix="validate") as pool:
            for item in items:
                batch.append(item)
                if len(batch) >= batch_size:
                    yield from self._run_batch(batch, pool)
                    batch = []
            yield from self._run_batch(batch, pool)

    def check(self, item: Record | Reject | RawRow | dict[str, Any]) -> Record | Reject:
        """Accept `item` (returned as a record) or return the `Reject` saying why not.

        Items may be canonical records, converter `Reject`s (reason given a code if missing),
        reader `RawRow`s (parsed, or rejected with their error) or plain dicts.
        """
        self.stats.rows += 1
        result = self._check(item)
        if isinstance(result, Reject):
            self.stats.rejected += 1
            self.stats.by_reason[reason_code(result.reason)] += 1
        else:
            self.stats.accepted += 1
        return result

    # -- record checks -----------------------------------------------------------------------
    def _check(self, item: Any) -> Record | Reject:
        if isinstance(item, Reject):
            return Reject(item.row, normalize_reason(item.reason), item.source)
        locator = f"row {self.stats.rows}"
        if isinstance(item, RawRow):
            if item.error is not None:
                return reject_raw_row(item)
            locator, item = item.locator, item.data
            if not isinstance(item, dict):
                return Reject(locator, reason("invalid_record", "expected a JSON object, got "
                                              f"{type(item).__name__}"), "validate")
        if isinstance(item, dict):
            try:
                item = parse_record(item, self.kind)
            except ValueError as e:
                return Reject(str(item.get("id") or locator), normalize_reason(str(e)),
                              "validate")
        problem = (self._duplicate(item) or self._structure(item) or self._placeholders(item)
                   or self._image_problems(item))
        return Reject(item.id, problem, "validate") if problem else item

    def _duplicate(self, record: Record) -> str | None:
        # Every occurrence after the first is rejected, even if the first was rejected too:
        # ids must be unique in the input, and which copy is "right" is not ours to guess.
        # Ids are compared in NFC: "é" typed precomposed and as "e" + combining accent look
        # the same to every reader of the data (and to a tokenizer that normalises).
        first, first_id = self._first_row.setdefault(unicodedata.normalize("NFC", record.id),
                                                     (self.stats.rows, record.id))
        if first == self.stats.rows:
            return None
        if first_id == record.id:
            return reason("duplicate_id", f"first seen at row {first}")
        return reason("duplicate_id", f"id {record.id!a} equals {first_id!a} of row "
                      f"{first} after Unicode NFC normalisation (the same text in another "
                      "Unicode form)")

    def _structure(self, record: Record) -> str | None:
        if isinstance(record, Sample):
            return _check_turns(record.conversations, "conversations", last="assistant")
        problem = _check_turns(record.prompt, "prompt", last="user")
        if problem is None and isinstance(record, PreferenceSample):
            for name in ("chosen", "rejected"):
                if not getattr(record, name).strip():
                    return reason("empty_assistant", f"{name} response is empty")
        return problem

    def _placeholders(self, record: Record) -> str | None:
        turns = record.conversations if isinstance(record, Sample) else record.prompt
        name = "conversations" if isinstance(record, Sample) else "prompt"
        for i, turn in enumerate(turns):
            if IMAGE_TOKEN not in turn.content or turn.role == "user":
                continue
            if turn.role == "system":
                return reason("placeholder_in_non_user_turn", f"{name}[{i}] (system) holds "
                              f"{IMAGE_TOKEN}; images go in user turns")
            if not self.images_in_responses:
                return reason("placeholder_in_non_user_turn", f"{name}[{i}] (assistant) holds "
                              f"{IMAGE_TOKEN}; images go in user turns (set "
                              "images_in_responses=true only if the model generates images)")
        groups = [("", sum(t.content.count(IMAGE_TOKEN) for t in turns), record.images)]
        if isinstance(record, PreferenceSample):
            groups += [("chosen has ", record.chosen.count(IMAGE_TOKEN), record.chosen_images),
                       ("rejected has ", record.rejected.count(IMAGE_TOKEN),
                        record.rejected_images)]
        for prefix, found, images in groups:
            if found != len(images):
                return reason("placeholder_mismatch", f"{prefix}{_plural(found, IMAGE_TOKEN)} "
                              f"placeholder{'' if found == 1 else 's'} for "
                              f"{_plural(len(images), 'image')}")
        return None

    def _image_problems(self, record: Record) -> str | None:
        for path in _all_images(record):
            result = self._image(path)
            if result is not None:
                return reason(*result)
        return None

    # -- images ------------------------------------------------------------------------------
    def _run_batch(self, batch: list[Any], pool: ThreadPoolExecutor) -> Iterator[Record | Reject]:
        if self.check_images:
            todo = {p for item in batch if hasattr(item, "images")
                    for p in _all_images(item) if p not in self._images}
            for path, result in zip(todo, pool.map(self._check_image, todo), strict=True):
                self._images[path] = result
        for item in batch:
            yield self.check(item)

    def _image(self, path: str) -> tuple[str, str] | None:
        if path not in self._images:  # cached: a chart shared by 6 samples is opened once
            self._images[path] = self._check_image(path)
        return self._images[path]

    def _check_image(self, path: str) -> tuple[str, str] | None:
        """(code, detail) for a bad image, None for a good one. Never raises for bad data."""
        if self.root is None:
            return "image_missing", f"{path}: the dataset has no image root configured"
        unsafe = _unsafe_path(path)
        if unsafe:
            return "image_path_unsafe", f"{path!r} {unsafe}; image paths must be relative to " \
                                        f"the image root {self.root}"
        uri = storage.join(str(self.root), path)
        if not self._s3:
            real = Path(uri).resolve()
            if not real.is_relative_to(self._root_real):
                return "image_path_unsafe", (f"{path} resolves to {real}, outside the image root "
                                             f"{self.root} (a symlink out of the dataset)")
            if not Path(uri).is_file():
                return "image_missing", f"{path} does not exist under {self.root}"
            if Path(uri).stat().st_size == 0:
                return "image_empty", f"{path} is 0 bytes under {self.root}"
        if not self.check_images:
            return None
        try:
            if self._s3:
                data = storage.read_bytes(uri)
                if not data:
                    return "image_empty", f"{path} is 0 bytes under {self.root}"
                return self._decode(io.BytesIO(data), path)
            with storage.open_read(uri) as f:
                return self._decode(f, path)
        except storage.StoreNotFoundError:
            return "image_missing", f"{path} does not exist under {self.root}"

    def _decode(self, f: IO[bytes], path: str) -> tuple[str, str] | None:
        # Header first (size, no pixels), then verify() (chunk CRCs), then one full decode:
        # verify() alone misses truncation in some formats, and load() catches it because we
        # never set ImageFile.LOAD_TRUNCATED_IMAGES.
        try:
            with _open_image(f) as image:
                width, height = image.size
                if width * height > self.max_image_pixels:
                    return "image_too_large", (f"{path} is {width}x{height} = {width * height:,} "
                                               f"pixels > max_image_pixels "
                                               f"{self.max_image_pixels:,}")
                image.verify()
            f.seek(0)
            with _open_image(f) as image:
                image.load()
                unsupported = check_convertible(image)
                if unsupported:
                    return "image_unsupported_mode", f"{path}: {unsupported}"
        except Image.DecompressionBombError as e:
            return "image_too_large", f"{path}: {e}"
        except UnidentifiedImageError:
            return "image_corrupt", f"{path} is not an image (PIL cannot identify its format)"
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
            if "truncat" in str(e).lower() or isinstance(e, EOFError):
                return "image_truncated", f"{path} is truncated ({e}); re-download or re-copy it"
            return "image_corrupt", f"{path} cannot be decoded ({type(e).__name__}: {e})"
        return None


def _open_image(f: IO[bytes]) -> Image.Image:
    """`Image.open` (header only) without PIL's DecompressionBombWarning: our own pixel limit
    decides, and PIL's hard limit still raises `DecompressionBombError`."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(f)


def _check_turns(turns: list[Turn], name: str, last: str) -> str | None:
    """Optional leading system turn, then user/assistant alternating from user, ending `last`."""
    start = 1 if turns and turns[0].role == "system" else 0
    if len(turns) <= start:
        what = "only a system turn" if turns else "no turns"
        return reason("empty_conversation", f"{name} has {what}")
    for i in range(start, len(turns)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        role = turns[i].role
        if role != expected:
            where = "a system turn may only come first" if role == "system" else \
                "turns must alternate user/assistant starting with user"
            return reason("non_alternating", f"{name}[{i}] is {role!r}, expected {expected!r} "
                          f"({where})")
        if role == "assistant" and not turns[i].content.strip():
            return reason("empty_assistant", f"{name}[{i}] (assistant) is empty")
    if turns[-1].role != last:
        return reason("non_alternating", f"{name} ends with a {turns[-1].role!r} turn; it must "
                      f"end with {last!r}")
    return None


def _all_images(record: Record) -> list[str]:
    if isinstance(record, PreferenceSample):
        return [*record.images, *record.chosen_images, *record.rejected_images]
    return list(record.images)


def _unsafe_path(path: str) -> str | None:
    """Why `path` may not be joined onto a root (absolute, drive, `..`, URI), else None."""
    if "://" in path:
        return "is a URI"
    if path.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(path):
        return "is absolute"
    if "\\" in path:
        return "contains a backslash (Windows path separator)"
    if ".." in PurePosixPath(path).parts:
        return "contains '..'"
    if not path.strip() or "\x00" in path:
        return "is empty or contains a NUL byte"
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 or word == IMAGE_TOKEN else f"{n} {word}s"
