"""MME's real eval_tool files and LLaVA-1.5's MME question/answer files.

`calculation_py` below is an independent, line-by-line reading of the official tool's rules
(pairs by position, `parse_pred_ans` on the lower-cased 4th field): mmjobs' reader + metric
(which pair by image) must give the same numbers on the real files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmjobs.eval.benchmarks import load_benchmark
from mmjobs.eval.benchmarks.answers import read_answers
from mmjobs.eval.benchmarks.mme import TASKS
from mmjobs.eval.metrics import ScoreInputError
from mmjobs.eval.score import score_file
from tests.real_data import REAL, placeholder_images, real

TOOL = REAL / "mme" / "eval_tool"
LLAVA = REAL / "mme" / "llava"
LINES = {"existence": 60, "count": 60, "position": 60, "color": 60}  # whole files; others 40
SPLIT_TASKS = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ subfolder


def calculation_py(path: Path) -> tuple[float, float]:
    """(acc, acc+) in percent, as MME's calculation.py computes them for one task file."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    right = []
    for line in lines:
        _, _, gt, pred = line.split("\t")
        pred = pred.lower()
        parsed = pred if pred in ("yes", "no") else (
            "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other")
        right.append(parsed == gt.lower())
    pairs = [right[i:i + 2] for i in range(0, len(right), 2)]
    assert all(len(p) == 2 for p in pairs)
    return 100 * sum(right) / len(right), 100 * sum(all(p) for p in pairs) / len(pairs)


def test_eval_tool_readme_documents_the_columns_the_reader_reads():
    readme = real("mme/eval_tool/readme.txt").read_text(encoding="utf-8")
    template = ('Image_Name + "\\t" + Question + "\\t" + Ground_Truth_Answer + "\\t" + '
                'Your_Response + "\\n"')
    assert template in readme
    assert "your response can only be in one line" in readme
    # the reader reads exactly those four tab-separated fields, response last
    rows = [a.row for a in read_answers("mme-eval-tool", str(TOOL / "LaVIN" / "OCR.txt"))]
    first = (TOOL / "LaVIN" / "OCR.txt").read_text(encoding="utf-8").split("\n")[0].split("\t")
    assert (rows[0]["image"], rows[0]["gt"], rows[0]["prediction"]) == (
        first[0], first[2].lower(), first[3])


def test_lavin_answer_files_score_like_calculation_py(tmp_path):
    summary = score_file(None, TOOL / "LaVIN", answer_format="mme-eval-tool",
                         output=tmp_path / "out")
    assert summary["metric"] == "mme" and summary["missing_tasks"] == []
    assert summary["count"] == sum(LINES.get(t, 40) for t in TASKS) == 640
    for task in TASKS:
        acc, acc_plus = calculation_py(TOOL / "LaVIN" / f"{task}.txt")
        got = summary["tasks"][task]
        assert got["acc"] == pytest.approx(acc) and got["acc_plus"] == pytest.approx(acc_plus)
        assert got["questions"] == LINES.get(task, 40)
    # LaVIN answers in truncated free text ("yes, there is a train in this image. the ...")
    # that calculation.py reads from its first 4 characters: 4 commonsense answers start
    # otherwise ("the apple in the picture does not look very fresh...") and count as wrong
    assert {t: v["other"] for t, v in summary["tasks"].items() if v["other"]} == {
        "commonsense_reasoning": 4}
    assert summary["total"] == pytest.approx(summary["perception"] + summary["cognition"])
    assert round(summary["perception"], 2) == 946.67 and round(summary["cognition"], 2) == 235.0
    assert (tmp_path / "out" / "summary.md").read_text().count("|") > 50


def test_unfilled_eval_tool_files_are_refused_with_the_fix():
    with pytest.raises(ScoreInputError) as err:
        score_file(None, TOOL / "Your_Results", answer_format="mme-eval-tool")
    assert len(err.value.errors) == 640  # every line of the template, none scored
    assert err.value.errors[0] == (
        "existence.txt line 1: no response: this is the unfilled template; add the model's "
        "one-line response as a 4th tab-separated field (eval_tool readme.txt)")


def mme_root(tmp_path: Path, question_files: list[Path]) -> Path:
    """An MME release-layout folder holding a placeholder image for every image named."""
    names = []
    for path in question_files:
        task = path.stem
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            folder = f"{task}/images" if task in SPLIT_TASKS else task
            names.append(f"{folder}/{line.split(chr(9))[0]}")
    return placeholder_images(tmp_path / "MME_Benchmark_release_version", names)


def test_mme_loader_reads_the_eval_tool_question_lists(tmp_path):
    official = sorted((TOOL / "Your_Results").glob("*.txt"))
    root = mme_root(tmp_path, official)
    items = list(load_benchmark("mme", root, questions_dir=str(TOOL / "Your_Results")))
    assert len(items) == 640 and len({i.id for i in items}) == 640
    assert [i.fields["task"] for i in items][::40][:2] == ["existence", "existence"]
    first = items[0]
    assert first.id == "existence/000000006040.jpg/0"
    assert first.prompt == "<image>\nIs there a train in this image? Please answer yes or no."
    assert first.images == [str(root / "existence" / "000000006040.jpg")]
    assert [i.fields["gt"] for i in items[:2]] == ["yes", "no"]  # each image: one Yes, one No
    # questions are used as written: position.txt has a full-width question mark
    assert any("？ Please answer yes or no." in i.prompt for i in items
               if i.fields["task"] == "position")
    assert items[-1].images[0].startswith(str(root / "code_reasoning"))
    art = next(i for i in items if i.fields["task"] == "artwork")
    assert "/artwork/images/" in art.images[0]
    # predictions answering the ground truth score 200 on every task
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": i.id, "prediction": i.fields["gt"].title(),
                                         **i.fields}) + "\n" for i in items))
    summary = score_file("mme", preds)
    assert {t: v["score"] for t, v in summary["tasks"].items()} == {t: 200.0 for t in TASKS}
    # LLaVA's copy of landmark.txt (first 200 lines): 100 images, read the same way
    llava_landmark = LLAVA / "eval_tool" / "Your_Results"
    root2 = mme_root(tmp_path / "2", [llava_landmark / "landmark.txt"])
    items = list(load_benchmark("mme", root2, questions_dir=str(llava_landmark),
                                tasks=["landmark"], prompt_suffix="\nAnswer briefly."))
    assert len(items) == 200 and len({i.fields["image"] for i in items}) == 100
    assert items[0].prompt.endswith("Please answer yes or no.\nAnswer briefly.")
    # an image the question list names but root lacks is reported before anything runs
    (root2 / "landmark" / "images" / "03c4b1901e4195f4.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="03c4b1901e4195f4"):
        load_benchmark("mme", root2, questions_dir=str(llava_landmark), tasks=["landmark"])


def test_llava_question_file_loads_with_unique_ids(tmp_path):
    path = LLAVA / "llava_mme.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    items = list(load_benchmark("llava-questions", path, image_root=str(tmp_path / "MME")))
    assert len(items) == len(rows) == 56
    # question_id is shared by an image's two questions: the repeat gets "#1"
    assert [i.id for i in items[:2]] == ["code_reasoning/0020.png", "code_reasoning/0020.png#1"]
    assert len({i.id for i in items}) == 56 and sum("#" in i.id for i in items) == 28
    assert [i.fields["question_id"] for i in items] == [r["question_id"] for r in rows]
    cats = [i.fields["category"] for i in items]
    assert sorted(set(cats)) == sorted(TASKS) and all(cats.count(t) == 4 for t in TASKS)
    for item, row in zip(items, rows, strict=True):
        assert item.prompt == "<image>\n" + row["text"]  # model_vqa_loader's prompt
        assert item.images == [str(tmp_path / "MME" / row["image"])]
        assert ("/images/" in row["question_id"]) == (row["category"] in SPLIT_TASKS)
        assert row["text"].endswith("\nAnswer the question using a single word or phrase.")
    # LLaVA's answers are in question-file order, one per question
    answers = [json.loads(line) for line in
               (LLAVA / "answers" / "llava-v1.5-7b.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["prompt"]) for a in answers] == [
        (r["question_id"], r["text"]) for r in rows]


GROUND_TRUTH = [str(TOOL / "Your_Results"), str(LLAVA / "eval_tool" / "Your_Results"),
                str(LLAVA / "eval_tool" / "answers" / "llava-v1.5-7b")]


def test_llava_answers_join_the_ground_truth_files_as_they_are(tmp_path):
    """The answers join the real ground-truth files; the 14 answers whose lines were cut from
    the excerpts are named, not dropped (LLaVA's converter would drop them silently)."""
    answers = LLAVA / "answers" / "llava-v1.5-7b.jsonl"
    with pytest.raises(ScoreInputError) as err:
        score_file(None, answers, answer_format="llava-mme", ground_truth=GROUND_TRUTH)
    missing = [e.split(":")[0] for e in err.value.errors]
    assert missing == [f"llava-v1.5-7b.jsonl line {n}" for n in
                       (5, 6, 7, 8, 9, 10, 29, 30, 31, 32, 43, 44, 55, 56)]
    assert "no ground truth for artwork 14777.jpg 'Does this artwork belong to the type of " \
           "religious?'" in err.value.errors[0]
    joined = [a.row for a in read_answers("llava-mme", str(answers), GROUND_TRUTH)
              if a.row is not None]
    assert len(joined) == 42
    # the joined rows score like calculation.py on the same (task, image, gt, answer) lines
    preds = tmp_path / "joined.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in joined))
    summary = score_file("mme", preds)
    code = summary["tasks"]["code_reasoning"]  # 0020: Yes->No, No->No; 0014: Yes->Yes, No->Yes
    assert (code["acc"], code["acc_plus"]) == (50.0, 0.0)
    landmark = [r for r in joined if r["task"] == "landmark"]
    assert [r["image"] for r in landmark] == ["02e3e418198427e7.jpg"] * 2  # LLaVA's landmark GT
    assert [r["gt"] for r in landmark] == ["yes", "no"]


def test_llava_answers_agree_with_llavas_own_conversion(tmp_path):
    """LLaVA's convert_answer_to_mme.py output (first column `<stem>.txt`) scores as the
    official tool reads it, and carries the same answers and ground truth as our join."""
    converted = LLAVA / "eval_tool" / "answers" / "llava-v1.5-7b"
    summary = score_file(None, converted, answer_format="mme-eval-tool")
    assert set(summary["tasks"]) == {"existence", "scene"}
    for task in ("existence", "scene"):
        acc, acc_plus = calculation_py(converted / f"{task}.txt")
        assert summary["tasks"][task]["acc"] == pytest.approx(acc)
        assert summary["tasks"][task]["acc_plus"] == pytest.approx(acc_plus)
    first_column = {r.row["image"] for r in read_answers("mme-eval-tool", str(converted))}
    assert all(name.endswith(".txt") for name in first_column)
    ours = {(r["task"], r["image"].rsplit(".", 1)[0], r["gt"], r["prediction"])
            for a in read_answers("llava-mme", str(LLAVA / "answers" / "llava-v1.5-7b.jsonl"),
                                  GROUND_TRUTH) if (r := a.row) is not None}
    theirs = {(r.row["task"], r.row["image"].rsplit(".", 1)[0], r.row["gt"], r.row["prediction"])
              for r in read_answers("mme-eval-tool", str(converted))}
    overlap = {t for t in ours if t[0] in ("existence", "scene")}
    assert len(overlap) >= 6 and overlap <= theirs
    # a single task file works too; copies outside the task names are ignored
    shutil.copyfile(converted / "scene.txt", tmp_path / "scene.txt")
    (tmp_path / "notes.txt").write_text("not an answer file\n")
    assert score_file(None, tmp_path, answer_format="mme-eval-tool")["count"] == 40


def test_score_command_reads_answer_files(capsys):
    from mmjobs.eval.score import score_main

    assert score_main(["--format", "mme-eval-tool", "--predictions", str(TOOL / "LaVIN")]) == 0
    out = capsys.readouterr().out
    assert "**MME**" in out and "| Total" in out
    assert score_main(["--format", "llava-mme", "--predictions",
                       str(LLAVA / "answers" / "llava-v1.5-7b.jsonl")]) == 1
    assert "format llava-mme needs --ground-truth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score_main(["--metric", "mme", "--predictions", "x.jsonl", "--ground-truth", "gt"])
    assert "--ground-truth goes with --format" in capsys.readouterr().err


def test_llava_question_style_is_llava_mme_jsonl_byte_for_byte(tmp_path):
    """`question_style: llava` on the official question lists gives LLaVA's llava_mme.jsonl
    text for every question the two real excerpts share (the recipe's MME prompt)."""
    official = sorted((TOOL / "Your_Results").glob("*.txt"))
    root = mme_root(tmp_path, official)
    items = list(load_benchmark("mme", root, questions_dir=str(TOOL / "Your_Results"),
                                question_style="llava"))
    prompts = {(i.fields["task"], i.fields["image"]): set() for i in items}
    for item in items:
        prompts[(item.fields["task"], item.fields["image"])].add(item.prompt)
    rows = [json.loads(line) for line in
            (LLAVA / "llava_mme.jsonl").read_text(encoding="utf-8").splitlines()]
    shared = [r for r in rows if (r["category"], Path(r["image"]).name) in prompts]
    assert len(shared) >= 30  # the excerpts overlap on 36 questions
    for row in shared:
        assert "<image>\n" + row["text"] in prompts[(row["category"], Path(row["image"]).name)]
    assert all(not i.prompt.count("Please answer yes or no.") for i in items)
    with pytest.raises(ValueError, match="drop prompt_suffix"):
        load_benchmark("mme", root, question_style="llava", prompt_suffix="\nAnswer briefly.")
