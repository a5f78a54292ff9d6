"""LLaVA mix665k: only its git-lfs pointer is public (PROVENANCE.md); it is not data."""

from __future__ import annotations

import pytest

from mmjobs.data.records import MalformedInputError
from tests.real_data import real
from tests.unit.data._real import prepare


def test_lfs_pointer_is_refused_naming_the_real_file(tmp_path):
    pointer = real("llava_mix665k/llava_v1_5_mix665k.json.git-lfs-pointer")
    text = pointer.read_text(encoding="ascii")
    assert "size 1029887963" in text  # the 1.03 GB file the pointer stands for
    with pytest.raises(MalformedInputError) as err:
        prepare("llava", pointer, None, tmp_path)
    message = str(err.value)
    assert "git-lfs pointer" in message and "1029887963" in message
    assert "sha256:ce959ce6e23073ee1cd1a8a2ef1c633768c10d4174327b8b2dc7113b91af6cf8" in message
    assert "git lfs pull" in message
    # JSONL inputs are checked too (a pointer would otherwise be 3 rejected "rows")
    copy = tmp_path / "mix665k.jsonl"
    copy.write_bytes(pointer.read_bytes())
    with pytest.raises(MalformedInputError, match="git-lfs pointer"):
        prepare("llava", copy, None, tmp_path)
