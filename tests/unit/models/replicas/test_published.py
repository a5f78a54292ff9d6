"""The vendored published files are byte-identical to the workplace's shared/real-models copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmjobs.models.replicas import PUBLISHED_ROOT

REPO = Path(__file__).resolve().parents[4]
# The project's shared/real-models/: the first one found above the repository, if any.
SHARED = next((p / "shared" / "real-models" for p in REPO.parents
               if (p / "shared" / "real-models" / "PROVENANCE.md").is_file()), None)
VENDORED = sorted(p.relative_to(PUBLISHED_ROOT) for p in PUBLISHED_ROOT.rglob("*")
                  if p.is_file() and p.name != "PROVENANCE.md")


def test_files_are_vendored():
    folders = {p.parts[0] for p in VENDORED}
    assert folders == {"llava-hf--llava-1.5-7b-hf", "lmsys--vicuna-7b-v1.5",
                       "openai--clip-vit-large-patch14-336", "liuhaotian--llava-v1.5-7b",
                       "facebook--chameleon-7b"}
    assert len(VENDORED) == 23


@pytest.mark.parametrize("rel", VENDORED, ids=str)
def test_vendored_file_equals_the_published_one(rel: Path):
    if SHARED is None:
        pytest.skip("no shared/real-models/ above the repository (a fresh clone): the vendored "
                    "copies are compared where that folder exists")
    original = SHARED / rel
    assert original.is_file(), f"{rel}: vendored but not in {SHARED}"
    assert (PUBLISHED_ROOT / rel).read_bytes() == original.read_bytes(), \
        f"{rel}: differs from {original}; re-copy it (never edit the vendored files)"
