"""Run a converter on a real file the way `mmjobs prepare` does: converter + validator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import Reject
from mmjobs.data.validate import Validator


def prepare(fmt: str, source: Path, image_root: Path | None, tmp: Path, **options: Any
            ) -> tuple[list[Any], list[Reject]]:
    """(records, rejects) of `fmt` on `source`, validated against `image_root` (images opened
    and decoded, ids checked for duplicates), with counts reconciled as the stage does."""
    converter = get_converter(fmt)
    ctx = ConvertContext(input=str(source), image_root=str(image_root) if image_root else None,
                         output_images=tmp / "drawn", options=options)
    validator = Validator(image_root, kind=converter.kind, workers=2,
                          images_in_responses=converter.images_in_responses)
    out = list(validator.run(converter.fn(ctx)))
    rejects = [o for o in out if isinstance(o, Reject)]
    records = [o for o in out if not isinstance(o, Reject)]
    stats = validator.stats
    assert stats.rows == len(out) == stats.accepted + stats.rejected == len(records) + len(rejects)
    return records, rejects
