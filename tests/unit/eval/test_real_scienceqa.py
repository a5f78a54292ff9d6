"""ScienceQA: the loader on the real pid_splits.json, LLaVA's CQM-A prompt text, and the metric's
answer parsing against the parses recorded in two real results files.

problems.json is not available as real bytes (PROVENANCE.md), so the loader tests build it in
tmp_path: placeholders for the split test, and for the prompt test the problems read back from
LLaVA's own test file (the text those problems produced).
"""

from __future__ import annotations

import json
import re
import shutil

from mmjobs.eval.benchmarks import load_benchmark
from mmjobs.eval.metrics.scienceqa import parse_answer, predicted_index
from tests.real_data import real

LETTER = "\nAnswer with the option's letter from the given choices directly."


def test_loader_reads_the_real_splits_with_string_ids(tmp_path):
    shutil.copyfile(real("scienceqa/official/pid_splits.json"), tmp_path / "pid_splits.json")
    splits = json.loads((tmp_path / "pid_splits.json").read_text())
    problems = {pid: {"question": f"Q{pid}?", "choices": ["a", "b"], "answer": 1, "hint": "",
                      "image": None, "grade": "grade1", "subject": "social science",
                      "split": "test"} for pid in splits["test"] + splits["minitest"]}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    for split in ("test", "minitest"):
        items = list(load_benchmark("scienceqa", tmp_path, split=split))
        assert [i.id for i in items] == splits[split]
        assert all(isinstance(i.id, str) for i in items) and items[0].images == []
    assert splits["test"][:4] == ["4", "5", "11", "15"]


def problems_from_llava_text(rows: list[dict]) -> dict[str, dict]:
    """Each problem as LLaVA's CQM-A text shows it: optional context, question, lettered
    options, the answer letter (a context may span lines: it ends at the last line break
    before the question)."""
    problems = {}
    for row in rows:
        text = row["conversations"][0]["value"].removeprefix("<image>\n")
        body, options = re.split(r"\n(?=A\. )", text, maxsplit=1)
        choices = re.split(r"\n[B-E]\. ", options.removeprefix("A. "))
        hint = ""
        if body.startswith("Context: "):
            hint, body = body.removeprefix("Context: ").rsplit("\n", 1)
        problems[row["id"]] = {
            "question": body, "choices": choices, "hint": hint, "grade": "grade5",
            "answer": "ABCDE".index(row["conversations"][1]["value"]),
            "image": "image.png" if "image" in row else None, "subject": "natural science",
            "split": "test"}
    return problems


def test_loader_prompt_is_llavas_cqm_a_text(tmp_path):
    rows = json.loads(real("scienceqa/llava/llava_test_CQM-A.json").read_text(encoding="utf-8"))
    (tmp_path / "problems.json").write_text(json.dumps(problems_from_llava_text(rows)))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": [r["id"] for r in rows]}))
    items = list(load_benchmark("scienceqa", tmp_path))
    assert len(items) == 12
    for item, row in zip(items, rows, strict=True):
        # LLaVA's model_vqa_science --single-pred-prompt: its text + the letter instruction
        assert item.prompt == row["conversations"][0]["value"] + LETTER
        assert item.images == ([str(tmp_path / "images" / "test" / row["id"] / "image.png")]
                               if "image" in row else [])
    assert sum(item.prompt.startswith("<image>\nContext: ") for item in items) == 4


def test_metric_parses_outputs_as_the_results_files_did():
    """Each file records the raw output and the index its scorer parsed from it: the metric's
    parser (LLaVA's eval_science_qa.py rules) reads the same letter from every output; the
    three empty GPT-3 outputs are unparseable (ScienceQA then picked a random choice, mmjobs
    scores them wrong)."""
    gpt3 = json.loads(real("scienceqa/official/results_gpt3_final_test_QCM-ALE_2_seed_3.json")
                      .read_text())
    llava = json.loads(real("scienceqa/llava/test_sqa_llava_13b_v0.json").read_text())
    for data in (gpt3, llava):
        assert set(data["results"]) == set(data["outputs"]) and len(data["results"]) == 25
        assert data["count"] == 4241  # the whole test split (the dicts here are cut)
    unparsed = []
    for name, data in (("gpt3", gpt3), ("llava", llava)):
        for pid, output in data["outputs"].items():
            letter = parse_answer(output)
            if letter is None:
                unparsed.append((name, pid, output))
                continue
            assert predicted_index(letter, 5) == data["results"][pid], (name, pid)
    assert unparsed == [("gpt3", "15", ""), ("gpt3", "22", ""), ("gpt3", "26", "")]
    # both files hold the same first 25 test pids, in pid_splits.json's order
    splits = json.loads(real("scienceqa/official/pid_splits.json").read_text())
    assert list(gpt3["results"]) == list(llava["results"]) == splits["test"]
