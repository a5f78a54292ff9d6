"""MLLM-DataEngine v1.0 demo files (real, whole) through the `dataengine` converter.

The parsed rows, GPT's raw results, the A-OKVQA bad cases, the generation prompts and the
question-type weights are the engine's own files; the v2 row format is documented only in its
README (an excerpt of which is vendored).
"""

from __future__ import annotations

import json
import re

import pytest

from mmjobs.data.converters.dataengine import parse_raw_instructions
from mmjobs.data.records import MalformedInputError
from tests.real_data import placeholder_images, real
from tests.unit.data._real import prepare

DEMO = "mllm_dataengine/v1_data_demo"
MC = "Answer with the option's letter from the given choices directly."


def coco(image_id: int) -> str:
    return f"train2014/COCO_train2014_{image_id:012d}.jpg"


def test_train_data_converts_with_coco_images(tmp_path):
    rows = json.loads(real(f"{DEMO}/gptvqa_train_data.json").read_text(encoding="utf-8"))
    root = placeholder_images(tmp_path / "coco", [coco(r["image_id"]) for r in rows])
    samples, rejects = prepare("dataengine", real(f"{DEMO}/gptvqa_train_data.json"), root,
                               tmp_path)
    assert rejects == [] and len(samples) == len(rows) == 2
    first = samples[0]
    assert first.id == "dataengine-407348-0"
    assert first.images == [coco(407348)]
    assert first.conversations[0].content == (
        "<image>\nWhat is likely to happen next in this image?\n"
        "A. The woman will put down her cell phone\n"
        "B. The woman will check the time on the clock\n"
        "C. The woman will put her handbag down\n"
        "D. The woman will continue talking on her cell phone\n" + MC)
    assert [s.conversations[1].content for s in samples] == ["D", "A"]
    assert {s.meta["question_type"] for s in samples} == {"future_prediction"}
    # the rationale form: the label dropped, the released text otherwise as is
    samples, _ = prepare("dataengine", real(f"{DEMO}/gptvqa_train_data.json"), root, tmp_path,
                         answer_style="letter_rationale")
    assert samples[1].conversations[1].content.startswith(
        "A. Because looking at the image, we can see that the boat is positioned")


def test_raw_parser_reproduces_the_released_fields():
    """Step4's parse of each row's raw_instructions gives exactly its released fields."""
    rows = json.loads(real(f"{DEMO}/gptvqa_train_data.json").read_text(encoding="utf-8"))
    for row in rows:
        parsed = parse_raw_instructions(row["raw_instructions"])
        assert parsed == {k: row[k] for k in parsed}, row["image_id"]
    # boxes inside a choice are removed and the words around them rejoined
    assert "[" in rows[0]["raw_instructions"] and "handbag [0.412" in rows[0]["raw_instructions"]


def test_raw_gpt_results_convert(tmp_path):
    path = real(f"{DEMO}/gptvqa_result.jsonl")  # JSON Lines: image_id, question_type, raw text
    ids = [json.loads(line)["image_id"] for line in path.read_text().splitlines()]
    root = placeholder_images(tmp_path / "coco", [coco(i) for i in ids])
    samples, rejects = prepare("dataengine", path, root, tmp_path)
    assert rejects == [] and [s.meta["image_id"] for s in samples] == ids == [84124, 122161,
                                                                            123008]
    assert [s.conversations[1].content for s in samples] == ["B", "B", "C"]
    assert [s.meta["question_type"] for s in samples] == [
        "spatial_relationship", "attribute_recognition", "nature_relation"]
    # boxes are gone from the prompt (Step4 removes them; the model never sees coordinates)
    assert all("[" not in s.conversations[0].content for s in samples)
    assert samples[1].conversations[0].content.startswith(
        "<image>\nWhat is the activity the people and are engaging in?\nA. Snowboarding\n")


def test_bad_case_answers_parse_like_gpt_answers():
    """The bad cases' `prompt` targets use GPT's "Question/Choices/Answer" text: the parser
    recovers each one's question, choices and correct index."""
    data = json.loads(real(f"{DEMO}/bad_case_aokvqa_classified.json").read_text())
    assert list(data) == ["identity_reasoning"] and len(data["identity_reasoning"]) == 8
    for case in data["identity_reasoning"]:
        parsed = parse_raw_instructions(case["prompt"])
        assert (parsed["question"], parsed["choices"], parsed["correct_choice_idx"]) == (
            case["question"], case["choices"], case["correct_choice_idx"]), case["idx"]
        assert len(case["direct_answers"]) == 10  # A-OKVQA rows: 10 direct answers each
        assert case["image_path"].startswith("val2017/")


def test_prompt_example_parses():
    """The in-context example GPT is shown in each generation prompt parses as GPT's answers
    do (4 choices, answer B, boxes removed)."""
    prompts = json.loads(real(f"{DEMO}/gptvqa_prompt.json").read_text())
    assert [(p["image_id"], p["question_type"]) for p in prompts] == [
        (84124, "spatial_relationship"), (122161, "attribute_recognition")]
    for p in prompts:
        example = re.search(r"Question: .*?\nExplanations?: [^\n]*", p["prompt"], re.S)
        assert example is not None
        parsed = parse_raw_instructions(example.group(0))
        assert len(parsed["choices"]) == 4 and 0 <= parsed["correct_choice_idx"] < 4
        assert "[" not in parsed["question"] + "".join(parsed["choices"])


def test_question_types_are_the_engines(tmp_path):
    """Every question_type in the demo rows is one weight.json weighs (18 types)."""
    weights = json.loads(real(f"{DEMO}/weight.json").read_text())
    assert len(weights) == 18 and all(0 <= w <= 1 for w in weights.values())
    path = real(f"{DEMO}/gptvqa_result.jsonl")
    ids = [json.loads(line)["image_id"] for line in path.read_text().splitlines()]
    root = placeholder_images(tmp_path / "coco", [coco(i) for i in ids])
    samples, _ = prepare("dataengine", path, root, tmp_path)
    train, _ = prepare("dataengine", real(f"{DEMO}/gptvqa_train_data.json"),
                       placeholder_images(root, [coco(407348), coco(550113)]), tmp_path)
    assert {s.meta["question_type"] for s in samples + train} <= set(weights)


def test_v2_readme_example_converts(tmp_path):
    """The README's v2 example, as printed, is not valid JSON (trailing commas) and misspells
    `choice_answer`: the file is refused naming the comma, the row rejected naming the key;
    with the README's own field list applied, the row converts (VG image path, letter D)."""
    text = real("mllm_dataengine/README.md.lines24-69.md").read_text(encoding="utf-8")
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    as_printed = tmp_path / "readme_example.json"
    as_printed.write_text(example, encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"a ',' after the last row .* remove the "
                                                  r"trailing comma"):
        prepare("dataengine", as_printed, None, tmp_path)
    fixed_comma = json.loads(re.sub(r",(\s*[}\]])", r"\1", example))
    (tmp_path / "typo.json").write_text(json.dumps(fixed_comma), encoding="utf-8")
    _, rejects = prepare("dataengine", tmp_path / "typo.json", None, tmp_path)
    assert "missing choice_answer (the README example spells it 'choide_answer')" in \
        rejects[0].reason
    documented = [{**{k: v for k, v in fixed_comma[0].items() if k != "choide_answer"},
                   "choice_answer": fixed_comma[0]["choide_answer"]}]
    (tmp_path / "v2.json").write_text(json.dumps(documented), encoding="utf-8")
    root = placeholder_images(tmp_path / "playground", ["vg/VG_100K_2/2404787.jpg"])
    samples, rejects = prepare("dataengine", tmp_path / "v2.json", root, tmp_path)
    assert rejects == [] and samples[0].images == ["vg/VG_100K_2/2404787.jpg"]
    assert samples[0].conversations[1].content == "D"
    assert samples[0].conversations[0].content == (
        "<image>\nWhere is the man wearing a black backpack positioned in the picture?\n"
        "A. Top right\nB. Bottom right\nC. Bottom left\nD. Left middle\n" + MC)
    assert samples[0].meta["qtype"] == 4 and samples[0].meta["short_answer"] == "Letf middle"
