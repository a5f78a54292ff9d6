"""ScienceQA's real pid_splits.json / captions.json / README, and LLaVA's test question file.

No byte of problems.json is public in a readable form (PROVENANCE.md): where the converter
needs it, the test writes a placeholder problems.json beside copies of the real split and
caption files, so what is checked is how the real files are read (string pids, split order,
captions only for problems with images).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.real_data import placeholder_images, real
from tests.unit.data._real import prepare

SPLITS = {"train", "val", "test", "trainval", "minitrain", "minival", "minitest"}


def problems_beside_real_splits(folder: Path, *, drop: str | None = None) -> dict:
    """Copies of pid_splits.json and captions.json, and a placeholder problems.json with one
    problem per listed pid (its split: the first of train/val/test listing it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("pid_splits.json", "captions.json"):
        shutil.copyfile(real(f"scienceqa/official/{name}"), folder / name)
    splits = json.loads((folder / "pid_splits.json").read_text())
    home = {pid: split for split in ("train", "val", "test") for pid in splits[split]}
    problems = {pid: {"question": f"Placeholder question {pid}?", "choices": ["yes", "no"],
                      "answer": 0, "hint": "", "image": None, "grade": "grade3",
                      "subject": "natural science", "lecture": "", "solution": "",
                      "split": home.get(pid, "train")}
                for split in splits.values() for pid in split if pid != drop}
    (folder / "problems.json").write_text(json.dumps(problems), encoding="utf-8")
    return splits


def test_converter_reads_the_real_splits_and_captions(tmp_path):
    splits = problems_beside_real_splits(tmp_path / "sqa", drop="4")
    assert set(splits) == SPLITS and all(len(v) == 25 for v in splits.values())
    assert all(isinstance(pid, str) for v in splits.values() for pid in v)  # "1", not 1
    samples, rejects = prepare("scienceqa", tmp_path / "sqa", None, tmp_path, split="test",
                               use_caption=True)
    # counts reconcile: 25 listed = 24 converted + pid "4" (listed, not in problems.json)
    assert [s.id for s in samples] == splits["test"][1:]
    assert [(r.row, r.reason.split(":")[0]) for r in rejects] == [("4", "invalid_row")]
    assert "pid 4 is listed in pid_splits.json['test'] but missing" in rejects[0].reason
    captions = json.loads(real("scienceqa/official/captions.json").read_text())["captions"]
    by_id = {s.id: s for s in samples}
    assert captions["5"] == "A large white kite is in the air."
    assert by_id["5"].conversations[0].content.startswith(
        "Context: A large white kite is in the air.\nQuestion: Placeholder question 5?")
    without = [pid for pid in splits["test"][1:] if pid not in captions]
    assert without and all(by_id[pid].conversations[0].content.startswith("Context: N/A\n")
                           for pid in without)  # text-only problems have no caption
    # minitest's problems keep their own split folder
    mini, _ = prepare("scienceqa", tmp_path / "sqa", None, tmp_path, split="minitest")
    assert [s.id for s in mini] == splits["minitest"]
    assert {s.meta["split"] for s in mini} == {"minitest"}


def test_readme_documents_every_field_the_converter_reads():
    text = real("scienceqa/official/README.md.lines236-259.md").read_text(encoding="utf-8")
    block = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    fields = set(block["(question id)"])
    read = {"question", "choices", "answer", "hint", "image", "subject", "grade", "lecture",
            "solution", "split", "category", "topic"}  # mmjobs.data.converters.scienceqa
    assert read <= fields
    assert "index of ground truth answer" in block["(question id)"]["answer"]  # 0-based index


def test_llava_converter_reads_llavas_test_file(tmp_path):
    """`llava_test_CQM-A.json` (LLaVA's ScienceQA test questions) is a LLaVA-format file."""
    path = real("scienceqa/llava/llava_test_CQM-A.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    images = [r["image"] for r in rows if "image" in r]
    root = placeholder_images(tmp_path / "test", images)
    samples, rejects = prepare("llava", path, root, tmp_path)
    assert rejects == [] and len(samples) == len(rows) == 12
    assert [s.id for s in samples] == [r["id"] for r in rows]
    assert [s.id for s in samples][:3] == ["4", "5", "11"]
    assert images == [f"{pid}/image.png" for pid in ("5", "11", "23", "42", "46")]
    for sample, row in zip(samples, rows, strict=True):
        user, answer = sample.conversations
        assert answer.content == row["conversations"][1]["value"] in "ABCDE"
        assert user.content.startswith("<image>\n") == ("image" in row)
        assert sample.images == ([row["image"]] if "image" in row else [])
    assert samples[0].conversations[0].content.endswith("\nA. chiasmus\nB. apostrophe")
    # the test ids are the first 12 test pids of the real pid_splits.json, in order
    splits = json.loads(real("scienceqa/official/pid_splits.json").read_text())
    assert [s.id for s in samples] == splits["test"][:12]
