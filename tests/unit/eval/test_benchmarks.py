"""Benchmark loaders on tiny fixtures of each official layout, built here in tmp_path.

Each `make_*` writes a few rows of the real file format (same names, same JSON/TSV shapes)
plus tiny images. Besides the items themselves, every loader's fields are checked the way the
infer stage uses them: predictions rows `{"id", "prediction", **fields}` that answer correctly
must score 100 with the benchmark's metric.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmjobs.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    BenchmarkItem,
    MissingBenchmarkFilesError,
    load_benchmark,
)
from mmjobs.eval.score import score_file

LETTER = "\nAnswer with the option's letter from the given choices directly."
SHORT = "\nAnswer the question using a single word or phrase."


# --------------------------------------------------------------------------- fixtures


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes | str | Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
    return path


def make_chartqa(root: Path) -> Path:
    write(root / "test" / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "What is the value of {x} in 2019?",
         "label": "13"},
        {"imgname": "41699051005347.png", "query": "Is the line rising?", "label": "Yes"},
    ])
    write(root / "test" / "test_augmented.json", [
        {"imgname": "two_col_1.png", "query": "What is the highest value?", "label": "79.6"},
    ])
    write(root / "test" / "png" / "41699051005347.png", png_bytes())
    write(root / "test" / "png" / "two_col_1.png", png_bytes((0, 0, 255)))
    return root


def make_scienceqa(root: Path) -> Path:
    problems = {
        "1": {"question": "Which figure of speech is used?", "choices": ["simile", "pun"],
              "answer": 1, "hint": "", "image": None, "task": "closed choice",
              "grade": "grade7", "subject": "language science", "split": "train",
              "lecture": "long lecture", "solution": "long solution"},
        "5": {"question": "Which animal is a mammal?", "choices": ["frog", "cat", "eel"],
              "answer": 1, "hint": "Look at the picture.", "image": "image.png",
              "grade": "grade2", "subject": "natural science", "split": "test",
              "lecture": "", "solution": ""},
        "8": {"question": "What is the capital of France?", "choices": ["Paris", "Rome"],
              "answer": 0, "hint": "", "image": "image.png", "grade": "grade10",
              "subject": "social science", "split": "test", "lecture": "", "solution": ""},
        "9": {"question": "Which word is a noun?", "choices": ["run", "table"], "answer": 1,
              "hint": "Read the list.", "image": None, "grade": "grade4",
              "subject": "language science", "split": "test", "lecture": "", "solution": ""},
    }
    write(root / "problems.json", problems)
    write(root / "pid_splits.json", {"train": ["1"], "val": [], "test": ["9", "5", "8"],
                                     "minitest": ["5"]})
    for pid in ("5", "8"):
        write(root / "images" / "test" / pid / "image.png", png_bytes())
    return root


def make_mme(root: Path) -> Path:
    # artwork: the questions_answers_YN/ + images/ layout; count: side by side.
    write(root / "artwork" / "questions_answers_YN" / "10002.txt",
          "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
          "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n")
    write(root / "artwork" / "images" / "10002.jpg", png_bytes(fmt="JPEG"))
    write(root / "count" / "000000006040.txt",
          "Is there a train in the picture? Please answer yes or no.\tYes\r\n"
          "Are there a total of two trains in the picture? Please answer yes or no.\tNo\r\n\n")
    write(root / "count" / "000000006040.jpg", png_bytes(fmt="JPEG"))
    return root


def tsv_cell(value: str) -> str:
    return value if not any(c in value for c in '\t\n"') else '"' + value.replace('"', '""') + '"'


def make_mmbench(root: Path, name: str = "mmbench_dev_20230712.tsv") -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
              "source", "l2-category", "comment", "split"]
    img = base64.b64encode(png_bytes()).decode()
    jpg = base64.b64encode(png_bytes((1, 2, 3), fmt="JPEG")).decode()
    rows = [
        ["0", "What is shown?", "nan", "a cat", "a dog", "a bird", "a fish", "B",
         "image_scene", img, "src", "l2", "", "dev"],
        ["7", 'Which is "correct"?\nPick one.', "The image shows a chart.", "yes", "no", "",
         "", "A", "attribute_recognition", jpg, "src", "l2", "", "dev"],
        # A circular copy of row 0 as VLMEvalKit stores it: options rotated by 1, the image
        # cell naming the row that holds it.
        ["1000000", "What is shown?", "nan", "a dog", "a bird", "a fish", "a cat", "A",
         "image_scene", "0", "src", "l2", "", "dev"],
    ]
    text = "\t".join(header) + "\n" + "".join("\t".join(tsv_cell(c) for c in r) + "\n"
                                              for r in rows)
    return write(root / name, text)


def make_gqa(root: Path) -> Path:
    write(root / "testdev_balanced_questions.json", {
        "20968379": {"imageId": "n288870", "question": "Do the shorts have dark color?",
                     "answer": "yes", "isBalanced": True,
                     "types": {"structural": "verify", "semantic": "attr"}},
        "20968380": {"imageId": "n288870", "question": "What color are the shorts?",
                     "answer": "black", "isBalanced": True, "types": {"structural": "query"}},
    })
    write(root / "images" / "n288870.jpg", png_bytes(fmt="JPEG"))
    return root


def make_vqav2(root: Path, split: str = "val2014", shuffled: bool = False) -> Path:
    questions = [{"image_id": 42, "question": "What color is the bus?", "question_id": 420},
                 {"image_id": 42, "question": "Is it raining?", "question_id": 421},
                 {"image_id": 73, "question": "How many dogs?", "question_id": 730}]
    answers = {420: ["red"] * 7 + ["dark red"] * 3, 421: ["no"] * 10, 730: ["2"] * 9 + ["two"]}
    types = {420: "other", 421: "yes/no", 730: "number"}
    annotations = [{"question_id": q["question_id"], "image_id": q["image_id"],
                    "answer_type": types[q["question_id"]], "multiple_choice_answer": "x",
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                for i, a in enumerate(answers[q["question_id"]])]}
                   for q in questions]
    if shuffled:
        annotations = annotations[::-1]
    write(root / f"v2_OpenEnded_mscoco_{split}_questions.json",
          {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
           "data_subtype": split, "questions": questions})
    if not split.startswith("test"):
        write(root / f"v2_mscoco_{split}_annotations.json",
              {"info": {}, "license": {}, "data_subtype": split, "annotations": annotations})
    folder = "test2015" if split == "test-dev2015" else split
    for image_id in (42, 73):
        write(root / folder / f"COCO_{folder}_{image_id:012d}.jpg", png_bytes(fmt="JPEG"))
    return root


def make_vqav2_test(root: Path) -> Path:
    """test-dev2015 (the questions asked) and test2015 (every question EvalAI wants an answer
    for: test-dev's and one more)."""
    make_vqav2(root, split="test-dev2015")
    dev = json.loads((root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())
    extra = {"image_id": 99, "question": "Is it a test question only?", "question_id": 99000}
    write(root / "v2_OpenEnded_mscoco_test2015_questions.json",
          {**dev, "data_subtype": "test2015", "questions": [*dev["questions"], extra]})
    return root


def make_seedbench(root: Path) -> Path:
    write(root / "SEED-Bench.json", {"questions": [
        {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three",
         "choice_d": "Four", "data_id": "1454426_2591111986", "data_type": "image",
         "question": "How many towels are in the image?", "question_id": "101669",
         "question_type_id": 5},
        {"answer": "B", "choice_a": "throwing", "choice_b": "catching", "choice_c": "lifting",
         "choice_d": "poking", "data_id": "94328.webm", "data_type": "video",
         "question": "What is the action?", "question_id": "v1738", "question_type_id": 10},
        {"answer": "C", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
         "data_id": "2000_1", "data_type": "image", "question": "Where is the cup?",
         "question_id": "101700", "question_type_id": 4},
    ], "question_type": {"Scene Understanding": 1, "Instance Location": 4,
                         "Instances Counting": 5, "Action Recognition": 10}})
    for data_id in ("1454426_2591111986", "2000_1"):
        write(root / "SEED-Bench-image" / data_id, png_bytes(fmt="JPEG"))
    return root


def make_jsonl(root: Path) -> Path:
    rows = [{"id": "a", "question": "What is the highest bar?", "image": "charts/1.png",
             "answers": ["7"], "split": "human"},
            {"question": "Is it a pie chart?", "answer": "no"}]
    write(root / "charts" / "1.png", png_bytes())
    return write(root / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")


def score_correct(tmp_path: Path, metric: str, items: list[BenchmarkItem],
                  answer: Any) -> dict[str, Any]:
    """Score predictions that answer every item right (`answer(item)` gives the text)."""
    path = tmp_path / f"pred-{metric}.jsonl"
    path.write_text("".join(json.dumps({"id": it.id, "prediction": answer(it), **it.fields})
                            + "\n" for it in items), encoding="utf-8")
    return score_file(metric, path)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_metrics() -> None:
    assert list(BENCHMARKS) == ["chartqa", "scienceqa", "mme", "mmbench", "gqa", "vqav2",
                                "seedbench", "jsonl", "llava-questions"]
    assert {n: b.metric for n, b in BENCHMARKS.items()} == {
        "chartqa": "chartqa", "scienceqa": "scienceqa", "mme": "mme", "mmbench": "mmbench",
        "gqa": "gqa", "vqav2": "vqav2", "seedbench": "seedbench", "jsonl": None,
        "llava-questions": None}


def test_unknown_benchmark_and_bad_options_are_reported_together(tmp_path) -> None:
    with pytest.raises(BenchmarkError, match="unknown benchmark 'chartqaa'; choose one of "
                                             "chartqa, scienceqa"):
        load_benchmark("chartqaa", tmp_path)
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("chartqa", tmp_path, {"splits": ["train"]}, bogus=1, limit=0)
    text = str(err.value)
    assert text.startswith("ChartQA options: ")
    assert "splits.0: Input should be 'human' or 'augmented'" in text
    assert "bogus: Extra inputs are not permitted" in text
    assert "limit: Input should be greater than or equal to 1" in text
    with pytest.raises(BenchmarkError, match=r"prompt_template: .*must contain the \{question\}"):
        load_benchmark("chartqa", tmp_path, prompt_template="no placeholder")


# --------------------------------------------------------------------------- chartqa


def test_chartqa_items_fields_and_chartmoe_prompts(tmp_path) -> None:
    root = make_chartqa(tmp_path / "ChartQA")
    items = list(load_benchmark("chartqa", root))
    assert [it.id for it in items] == ["human-0", "human-1", "augmented-0"]
    first = items[0]
    # ChartMoE's eval_ChartQA.py appends the question right after the period
    assert first.prompt == ("<image>\nAnswer the question using a single word or phrase."
                            "What is the value of {x} in 2019?")
    assert first.images == [str(root / "test" / "png" / "41699051005347.png")]
    assert first.fields == {"answers": ["13"], "split": "human"}
    assert items[2].fields == {"answers": ["79.6"], "split": "augmented"}

    pot = list(load_benchmark("chartqa", root, pot=True, splits=["augmented"]))
    assert pot[0].prompt == ("<image>\nPlease give the program of thought in python code. Use "
                             "print function to output the answer in the end.What is the "
                             "highest value?")
    pot0 = next(load_benchmark("chartqa", root, pot=True, pot_prompt=0, limit=1))
    assert pot0.prompt.endswith("Please give the program of thought.What is the value of "
                                "{x} in 2019?")
    custom = next(load_benchmark("chartqa", root, prompt_template="<image> Q: {question}"))
    assert custom.prompt == "<image> Q: What is the value of {x} in 2019?"  # no second token
    assert [it.id for it in load_benchmark("chartqa", root, limit=1)] == ["human-0",
                                                                          "augmented-0"]

    summary = score_correct(tmp_path, "chartqa", items, lambda it: it.fields["answers"][0])
    assert summary["accuracy"]["0.05"]["average"] == 1.0


def test_chartqa_missing_file_names_it_and_the_layout(tmp_path) -> None:
    root = make_chartqa(tmp_path / "ChartQA")
    (root / "test" / "test_human.json").unlink()
    with pytest.raises(MissingBenchmarkFilesError) as err:
        load_benchmark("chartqa", root)
    assert str(err.value) == (
        f"ChartQA: missing {root}/test/test_human.json; expected the official layout: "
        "test/test_human.json, test/test_augmented.json, test/png/")
    # Only the requested splits are required.
    assert len(list(load_benchmark("chartqa", root, splits=["augmented"]))) == 1


def test_malformed_json_names_the_file(tmp_path) -> None:
    root = make_chartqa(tmp_path / "ChartQA")
    (root / "test" / "test_human.json").write_text('[{"imgname": "a.png", ', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"test_human.json: not valid JSON"):
        list(load_benchmark("chartqa", root))


# --------------------------------------------------------------------------- scienceqa


def test_scienceqa_llava_prompts_fields_and_images(tmp_path) -> None:
    root = make_scienceqa(tmp_path / "scienceqa")
    items = list(load_benchmark("scienceqa", root))
    assert [it.id for it in items] == ["9", "5", "8"]  # pid_splits order
    no_image, with_hint, no_hint = items
    assert no_image.images == []
    assert no_image.prompt == ("Context: Read the list.\nWhich word is a noun?\nA. run\n"
                               "B. table" + LETTER)
    assert with_hint.prompt == ("<image>\nContext: Look at the picture.\nWhich animal is a "
                                "mammal?\nA. frog\nB. cat\nC. eel" + LETTER)
    assert with_hint.images == [str(root / "images" / "test" / "5" / "image.png")]
    assert no_hint.prompt.startswith("<image>\nWhat is the capital of France?\nA. Paris")
    assert with_hint.fields == {"choices": ["frog", "cat", "eel"], "answer": 1,
                                "subject": "natural science", "grade": "grade2",
                                "hint": "Look at the picture.", "has_image": True}
    assert [it.id for it in load_benchmark("scienceqa", root, image_only=True)] == ["5", "8"]
    # minitest problems keep their own split's image folder.
    mini = next(load_benchmark("scienceqa", root, split="minitest"))
    assert mini.images == [str(root / "images" / "test" / "5" / "image.png")]

    summary = score_correct(tmp_path, "scienceqa", items,
                            lambda it: "ABCDE"[it.fields["answer"]])
    assert summary["accuracy"]["Avg"] == 100.0 and summary["accuracy"]["IMG"] == 100.0


def test_scienceqa_lavin_prompt_and_errors(tmp_path) -> None:
    root = make_scienceqa(tmp_path / "scienceqa")
    item = next(load_benchmark("scienceqa", root, style="lavin"))
    assert item.prompt == ("Question: Which word is a noun?\nContext: Read the list.\n"
                           "Options: (A) run (B) table\nResponse:")
    with pytest.raises(BenchmarkError, match=r"split 'dev' is not in .*pid_splits\.json; "
                                             r"available: minitest, test, train, val"):
        load_benchmark("scienceqa", root, split="dev")
    (root / "pid_splits.json").unlink()
    with pytest.raises(MissingBenchmarkFilesError, match=r"ScienceQA: missing .*/pid_splits.json;"
                       r" expected the official layout: problems.json, pid_splits.json"):
        load_benchmark("scienceqa", root)


# --------------------------------------------------------------------------- mme


def test_mme_both_folder_layouts(tmp_path) -> None:
    root = make_mme(tmp_path / "MME_Benchmark_release_version")
    items = list(load_benchmark("mme", root, tasks=["artwork", "count"]))
    assert [it.id for it in items] == ["artwork/10002.jpg/0", "artwork/10002.jpg/1",
                                       "count/000000006040.jpg/0", "count/000000006040.jpg/1"]
    assert items[0].prompt == ("<image>\nDoes this artwork exist in the form of painting? "
                               "Please answer yes or no.")
    assert items[0].images == [str(root / "artwork" / "images" / "10002.jpg")]
    assert items[2].images == [str(root / "count" / "000000006040.jpg")]
    assert [it.fields for it in items[2:]] == [
        {"task": "count", "image": "000000006040.jpg", "gt": "yes"},
        {"task": "count", "image": "000000006040.jpg", "gt": "no"}]
    summary = score_correct(tmp_path, "mme", items, lambda it: it.fields["gt"].capitalize())
    assert summary["tasks"]["count"]["score"] == 200.0

    # The zip's inner MME_Benchmark/ folder is found from one level up.
    outer = tmp_path / "outer"
    (outer).mkdir()
    root.rename(outer / "MME_Benchmark")
    assert len(list(load_benchmark("mme", outer, tasks=["count"], prompt_suffix="!"))) == 2


def test_mme_missing_task_and_image(tmp_path) -> None:
    root = make_mme(tmp_path / "MME")
    with pytest.raises(MissingBenchmarkFilesError) as err:
        load_benchmark("mme", root, tasks=["count", "OCR", "scene"])
    assert str(err.value).startswith(f"MME: missing {root}/OCR/, {root}/scene/; expected the "
                                     "official layout: <task>/questions_answers_YN/")
    (root / "count" / "000000006040.jpg").unlink()
    with pytest.raises(MissingBenchmarkFilesError, match=r"000000006040\.txt has no image "
                                                         r"count/000000006040"):
        load_benchmark("mme", root, tasks=["count"])
    with pytest.raises(BenchmarkError, match="unknown MME task"):
        load_benchmark("mme", root, tasks=["art"])


# --------------------------------------------------------------------------- mmbench


def test_mmbench_rows_images_and_llava_prompt(tmp_path) -> None:
    tsv = make_mmbench(tmp_path / "mmbench")
    cache = tmp_path / "cache"
    items = list(load_benchmark("mmbench", tsv.parent, cache_dir=str(cache)))
    assert [it.id for it in items] == ["0", "7", "1000000"]
    main, hinted, copy = items
    assert main.prompt == ("<image>\nWhat is shown?\nA. a cat\nB. a dog\nC. a bird\nD. a fish"
                           + LETTER)
    assert main.fields == {"index": 0, "options": {"A": "a cat", "B": "a dog", "C": "a bird",
                                                   "D": "a fish"},
                           "gt": "B", "category": "image_scene"}
    assert hinted.prompt == ('<image>\nThe image shows a chart.\nWhich is "correct"?\nPick one.'
                             "\nA. yes\nB. no" + LETTER)
    assert hinted.fields["options"] == {"A": "yes", "B": "no"}
    assert main.images == [str(cache / "0.png")] and hinted.images == [str(cache / "7.jpg")]
    assert copy.images == main.images  # "0" in the image cell: row 0's image
    assert Path(main.images[0]).read_bytes() == png_bytes()
    # The TSV itself as root; default cache under $MMJOBS_HOME.
    again = list(load_benchmark("mmbench", tsv))
    assert "/cache/mmbench/" in again[0].images[0] and Path(again[0].images[0]).is_file()

    summary = score_correct(tmp_path, "mmbench", items, lambda it: it.fields["gt"])
    assert summary["accuracy"] == 100.0 and summary["circular"] is True


def test_mmbench_circular_copies_rotate_options_and_answer(tmp_path) -> None:
    tsv = make_mmbench(tmp_path / "mmbench")
    items = list(load_benchmark("mmbench", tsv, circular=True, cache_dir=str(tmp_path / "c")))
    # Row 0: 4 rotations; row 7: 2; the file's own copy (1000000) is replaced by ours.
    assert [it.id for it in items] == ["0", "1000000", "2000000", "3000000", "7", "1000007"]
    by_id = {it.id: it for it in items}
    assert by_id["1000000"].fields["options"] == {"A": "a dog", "B": "a bird", "C": "a fish",
                                                  "D": "a cat"}
    assert [by_id[i].fields["gt"] for i in ("0", "1000000", "2000000", "3000000")] == [
        "B", "A", "D", "C"]  # always "a dog"
    assert by_id["1000007"].fields == {"index": 1000007, "options": {"A": "no", "B": "yes"},
                                       "gt": "B", "category": "attribute_recognition"}
    assert by_id["2000000"].prompt.endswith("A. a bird\nB. a fish\nC. a cat\nD. a dog" + LETTER)
    summary = score_correct(tmp_path, "mmbench", items, lambda it: it.fields["gt"])
    assert summary["groups"] == 2 and summary["accuracy"] == 100.0


def test_mmbench_missing_tsv_and_bad_columns(tmp_path) -> None:
    with pytest.raises(MissingBenchmarkFilesError) as err:
        load_benchmark("mmbench", tmp_path)
    assert str(err.value).startswith(f"MMBench: missing {tmp_path}/mmbench_dev_20230712.tsv; "
                                     "expected the official layout: a TSV file")
    write(tmp_path / "bad.tsv", "index\tquestion\n0\tq\n")
    with pytest.raises(BenchmarkError, match=r"lacks the column\(s\) A, B, image"):
        list(load_benchmark("mmbench", tmp_path / "bad.tsv"))


# --------------------------------------------------------------------------- gqa


def test_gqa_items_and_fields(tmp_path) -> None:
    root = make_gqa(tmp_path / "gqa")
    items = list(load_benchmark("gqa", root))
    assert [it.id for it in items] == ["20968379", "20968380"]
    assert items[0].prompt == "<image>\nDo the shorts have dark color?" + SHORT
    assert items[0].images == [str(root / "images" / "n288870.jpg")]
    assert items[0].fields == {"answer": "yes", "is_balanced": True, "structural_type": "verify"}
    summary = score_correct(tmp_path, "gqa", items, lambda it: it.fields["answer"])
    assert summary["accuracy"] == 100.0 and summary["open"] == 100.0
    (root / "images" / "n288870.jpg").unlink()
    with pytest.raises(MissingBenchmarkFilesError, match=r"GQA: missing .*/images/; expected"):
        load_benchmark("gqa", root)


# --------------------------------------------------------------------------- vqav2


@pytest.mark.parametrize("shuffled", [False, True])
def test_vqav2_joins_annotations_in_any_order(tmp_path, shuffled) -> None:
    root = make_vqav2(tmp_path / "vqav2", shuffled=shuffled)
    items = list(load_benchmark("vqav2", root))
    assert [it.id for it in items] == ["420", "421", "730"]
    assert items[0].prompt == "<image>\nWhat color is the bus?" + SHORT
    assert items[0].images == [str(root / "val2014" / "COCO_val2014_000000000042.jpg")]
    assert items[0].fields == {"answers": ["red"] * 7 + ["dark red"] * 3, "answer_type": "other"}
    assert items[2].fields["answer_type"] == "number"
    summary = score_correct(tmp_path, "vqav2", items, lambda it: it.fields["answers"][0])
    assert summary["accuracy"] == 100.0


def test_vqav2_test_dev_has_no_answers_and_uses_test2015_images(tmp_path) -> None:
    root = make_vqav2(tmp_path / "vqav2", split="test-dev2015")
    items = list(load_benchmark("vqav2", root, split="test-dev2015", limit=2))
    assert len(items) == 2 and items[0].fields == {}
    assert items[0].images == [str(root / "test2015" / "COCO_test2015_000000000042.jpg")]
    val = make_vqav2(tmp_path / "v2")
    (val / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(MissingBenchmarkFilesError) as err:
        load_benchmark("vqav2", val)
    assert str(err.value).startswith(
        f"VQAv2: missing {val}/v2_mscoco_val2014_annotations.json; expected the official "
        "layout: v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json")


# --------------------------------------------------------------------------- seedbench


def test_seedbench_image_questions_only(tmp_path) -> None:
    root = make_seedbench(tmp_path / "SEED-Bench")
    items = list(load_benchmark("seedbench", root))
    assert [it.id for it in items] == ["101669", "101700"]
    assert items[0].prompt == ("<image>\nHow many towels are in the image?\nA. One\nB. Two\n"
                               "C. Three\nD. Four" + LETTER)
    assert items[0].images == [str(root / "SEED-Bench-image" / "1454426_2591111986")]
    assert items[0].fields == {"answer": "A", "question_type_id": 5, "data_type": "image"}
    summary = score_correct(tmp_path, "seedbench", items, lambda it: it.fields["answer"])
    assert summary["accuracy"] == 100.0 and set(summary["per_question_type"]) == {"4", "5"}
    assert [it.id for it in load_benchmark("seedbench", root, limit=1)] == ["101669"]


# --------------------------------------------------------------------------- jsonl


def test_jsonl_generic_rows(tmp_path) -> None:
    path = make_jsonl(tmp_path / "mine")
    items = list(load_benchmark("jsonl", path.parent, prompt_suffix=SHORT))
    assert [it.id for it in items] == ["a", "2"]  # no id: the line number
    assert items[0].prompt == "<image>\nWhat is the highest bar?" + SHORT
    assert items[0].images == [str(path.parent / "charts" / "1.png")]
    assert items[0].fields == {"answers": ["7"], "split": "human"}
    assert items[1].images == [] and items[1].fields == {"answer": "no"}
    assert next(load_benchmark("jsonl", path, image_root="s3://bucket/imgs")).images == [
        "s3://bucket/imgs/charts/1.png"]
    write(tmp_path / "bad.jsonl", '{"question": "ok"}\n{"id": 3}\n')
    with pytest.raises(BenchmarkError, match=r"bad.jsonl: line 2: expected an object with a "
                                             r"string 'question'"):
        list(load_benchmark("jsonl", tmp_path / "bad.jsonl"))
    with pytest.raises(MissingBenchmarkFilesError, match=r"JSONL: missing .*/questions.jsonl"):
        load_benchmark("jsonl", tmp_path / "nowhere")
