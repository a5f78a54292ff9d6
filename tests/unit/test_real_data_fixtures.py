"""The vendored real-data excerpts: byte-identical to their sources, and each one read by a test.

- sizes and sha256 prefixes equal PROVENANCE.md's table (works on a clean clone);
- every file equals `shared/real-data/` byte for byte where that folder exists (skipped, with
  the reason, where it does not: CI's fresh machine);
- every file PROVENANCE.md lists has a registered reader test (`tests/real_data.py::READERS`)
  that exists.
"""

from __future__ import annotations

import hashlib
from fnmatch import fnmatchcase

import pytest

from tests.real_data import NOTES, READERS, REAL, REPO, provenance, readers_for, shared_real_data
from tests.real_data import test_names as names_in


def test_every_listed_file_has_its_recorded_size_and_hash():
    rows = provenance()
    assert len(rows) == 68
    for row in rows:
        data = (REAL / row.file).read_bytes()
        assert len(data) == row.size, row.file
        assert hashlib.sha256(data).hexdigest()[:16] == row.sha256_16, row.file


def test_the_folder_holds_the_listed_files_and_our_notes_only():
    listed = {row.file for row in provenance()}
    present = {p.relative_to(REAL).as_posix() for p in REAL.rglob("*") if p.is_file()}
    notes = {f for f in present if f.rsplit("/", 1)[-1] in NOTES}
    assert present - notes - {"README.md"} == listed
    assert "README.md" in present  # ours: licensing caveats, how to refresh


def test_copy_is_byte_identical_to_shared_real_data():
    shared = shared_real_data()
    if shared is None:
        pytest.skip("no shared/real-data/ above the repository (a fresh clone): the copy is "
                    "checked against PROVENANCE.md's sizes and hashes instead")
    theirs = {p.relative_to(shared).as_posix() for p in shared.rglob("*") if p.is_file()}
    ours = {p.relative_to(REAL).as_posix() for p in REAL.rglob("*") if p.is_file()}
    assert ours - {"README.md"} == theirs
    for rel in sorted(theirs):
        assert (REAL / rel).read_bytes() == (shared / rel).read_bytes(), rel


def test_every_listed_file_is_read_by_a_registered_test_that_exists():
    unread = [row.file for row in provenance() if not readers_for(row.file)]
    assert unread == []
    for tests in READERS.values():
        for node in tests:
            path, name = node.split("::")
            assert name in names_in(REPO / path), node
    # and no pattern matches nothing (a stale entry after a file is renamed)
    for pattern in READERS:
        assert any(fnmatchcase(row.file, pattern) for row in provenance()), pattern
