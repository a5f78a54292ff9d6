"""The vendored real dataset excerpts (`tests/fixtures/real-data/`) and who reads them.

`REAL` is the folder: a byte-identical copy of the project's `shared/real-data/` (see its
README), so tests run on a clean clone where `../shared` does not exist.
`tests/unit/test_real_data_fixtures.py` checks the copy against PROVENANCE.md (sizes, sha256)
and against `shared/real-data/` where that folder exists.

`READERS` maps every file PROVENANCE.md lists to the tests that run an mmjobs converter,
benchmark loader or answer-file reader on it, as it is; the fixture test fails when a listed
file has no reader test, or a named test does not exist. Tests never modify these files:
where a reader needs images or a companion file, the test builds them in `tmp_path` (beside a
copy, or under a generated image root).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "fixtures" / "real-data"
NOTES = ("PROVENANCE.md", "FORMAT_FACTS.md", "SCHEMA.md")  # our own notes, not excerpts


def real(rel: str) -> Path:
    """The vendored copy of `shared/real-data/<rel>` (it must exist)."""
    path = REAL / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a vendored real-data file")
    return path


def shared_real_data() -> Path | None:
    """The project's `shared/real-data/` (the first one found above the repository), or None."""
    for parent in REPO.parents:
        candidate = parent / "shared" / "real-data"
        if (candidate / "PROVENANCE.md").is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Provenance:
    """One row of PROVENANCE.md's table."""

    file: str
    identical: str  # "yes", "lines identical (prefix)", "NO (derived ...)", ...
    size: int
    sha256_16: str

    @property
    def derived(self) -> bool:
        """Marked NO: assembled or converted by whoever collected the excerpts."""
        return self.identical.startswith("NO")


def provenance() -> list[Provenance]:
    """The table rows of PROVENANCE.md, in order."""
    rows = []
    for line in (REAL / "PROVENANCE.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append(Provenance(file=cells[0].strip("`"), identical=cells[-3],
                               size=int(cells[-2].replace(",", "")),
                               sha256_16=cells[-1].strip("`")))
    return rows


_EVAL = "tests/unit/eval"
_DATA = "tests/unit/data"
# Every PROVENANCE.md file (a glob matches several) -> the tests that read it with mmjobs code.
READERS: dict[str, tuple[str, ...]] = {
    # MME: the official eval_tool and LLaVA-1.5's files
    "mme/eval_tool/readme.txt": (
        f"{_EVAL}/test_real_mme.py::test_eval_tool_readme_documents_the_columns_the_reader_reads",),
    "mme/eval_tool/Your_Results/*.txt": (
        f"{_EVAL}/test_real_mme.py::test_mme_loader_reads_the_eval_tool_question_lists",
        f"{_EVAL}/test_real_mme.py::test_unfilled_eval_tool_files_are_refused_with_the_fix",
        f"{_EVAL}/test_real_mme.py::test_llava_answers_join_the_ground_truth_files_as_they_are"),
    "mme/eval_tool/LaVIN/*.txt": (
        f"{_EVAL}/test_real_mme.py::test_lavin_answer_files_score_like_calculation_py",),
    "mme/llava/llava_mme.jsonl": (
        f"{_EVAL}/test_real_mme.py::test_llava_question_file_loads_with_unique_ids",),
    "mme/llava/answers/llava-v1.5-7b.jsonl": (
        f"{_EVAL}/test_real_mme.py::test_llava_answers_join_the_ground_truth_files_as_they_are",
        f"{_EVAL}/test_real_mme.py::test_llava_answers_agree_with_llavas_own_conversion"),
    "mme/llava/eval_tool/answers/llava-v1.5-7b/*.txt": (
        f"{_EVAL}/test_real_mme.py::test_llava_answers_agree_with_llavas_own_conversion",),
    "mme/llava/eval_tool/Your_Results/landmark.txt": (
        f"{_EVAL}/test_real_mme.py::test_mme_loader_reads_the_eval_tool_question_lists",
        f"{_EVAL}/test_real_mme.py::test_llava_answers_join_the_ground_truth_files_as_they_are"),
    # MMBench
    "mmbench/llava/answers/mmbench_dev_20230712/*.jsonl": (
        f"{_EVAL}/test_real_mmbench.py::test_llava_answers_score_against_the_upload_ground_truth",
        f"{_EVAL}/test_real_mmbench.py::test_13b_answers_are_the_upload_predictions"),
    "mmbench/llava/answers_upload/mmbench_dev_20230712/*.tsv": (
        f"{_EVAL}/test_real_mmbench.py::test_upload_sheet_scores_with_its_own_columns",
        f"{_EVAL}/test_real_mmbench.py::test_13b_answers_are_the_upload_predictions"),
    # SEED-Bench
    "seed_bench/official/DATASET.md.lines217-301.md": (
        f"{_EVAL}/test_real_seedbench.py::test_dataset_doc_question_types_match_the_metric",),
    "seed_bench/official/evaluate_result/SEED-Bench-1/GPT-4V.json": (
        f"{_EVAL}/test_real_seedbench.py::test_seed_bench_result_lines_score_as_they_are",),
    "seed_bench/llava/answers_upload/llava-v1.5-13b.jsonl": (
        f"{_EVAL}/test_real_seedbench.py::test_llava_upload_joins_seed_bench_json",),
    "seed_bench/derived/SEED-Bench.doc-examples.json": (
        f"{_EVAL}/test_real_seedbench.py::test_loader_reads_the_documented_records",
        f"{_EVAL}/test_real_seedbench.py::test_llava_upload_joins_seed_bench_json"),
    # ScienceQA
    "scienceqa/official/pid_splits.json": (
        f"{_DATA}/test_real_scienceqa.py::test_converter_reads_the_real_splits_and_captions",
        f"{_EVAL}/test_real_scienceqa.py::test_loader_reads_the_real_splits_with_string_ids"),
    "scienceqa/official/captions.json": (
        f"{_DATA}/test_real_scienceqa.py::test_converter_reads_the_real_splits_and_captions",),
    "scienceqa/official/results_gpt3_final_test_QCM-ALE_2_seed_3.json": (
        f"{_EVAL}/test_real_scienceqa.py::test_metric_parses_outputs_as_the_results_files_did",),
    "scienceqa/official/README.md.lines236-259.md": (
        f"{_DATA}/test_real_scienceqa.py::test_readme_documents_every_field_the_converter_reads",),
    "scienceqa/llava/llava_test_CQM-A.json": (
        f"{_DATA}/test_real_scienceqa.py::test_llava_converter_reads_llavas_test_file",
        f"{_EVAL}/test_real_scienceqa.py::test_loader_prompt_is_llavas_cqm_a_text"),
    "scienceqa/llava/test_sqa_llava_13b_v0.json": (
        f"{_EVAL}/test_real_scienceqa.py::test_metric_parses_outputs_as_the_results_files_did",),
    # MLLM-DataEngine
    "mllm_dataengine/v1_data_demo/gptvqa_train_data.json": (
        f"{_DATA}/test_real_dataengine.py::test_train_data_converts_with_coco_images",
        f"{_DATA}/test_real_dataengine.py::test_raw_parser_reproduces_the_released_fields"),
    "mllm_dataengine/v1_data_demo/gptvqa_result.jsonl": (
        f"{_DATA}/test_real_dataengine.py::test_raw_gpt_results_convert",),
    "mllm_dataengine/v1_data_demo/bad_case_aokvqa_classified.json": (
        f"{_DATA}/test_real_dataengine.py::test_bad_case_answers_parse_like_gpt_answers",),
    "mllm_dataengine/v1_data_demo/gptvqa_prompt.json": (
        f"{_DATA}/test_real_dataengine.py::test_prompt_example_parses",),
    "mllm_dataengine/v1_data_demo/weight.json": (
        f"{_DATA}/test_real_dataengine.py::test_question_types_are_the_engines",),
    "mllm_dataengine/README.md.lines24-69.md": (
        f"{_DATA}/test_real_dataengine.py::test_v2_readme_example_converts",),
    # ChartMoE
    "chartmoe/train_data_mix/*.txt": (
        f"{_DATA}/test_real_chartmoe.py::test_data_mix_files_parse",),
    "chartmoe/train_README.md.lines29-62.md": (
        f"{_DATA}/test_real_chartmoe.py::test_readme_example_is_refused_with_the_reason",),
    # ChartQA
    "chartqa/test/test_*.json": (
        f"{_EVAL}/test_real_chartqa.py::test_loader_reads_both_serialisations",
        f"{_EVAL}/test_real_chartqa.py::test_labels_score_under_both_variants"),
    # GQA
    "gqa/llava/llava_gqa_testdev_balanced.jsonl": (
        f"{_EVAL}/test_real_gqa.py::test_llava_question_file_keeps_string_ids",
        f"{_EVAL}/test_real_gqa.py::test_gqa_loader_prompt_is_llavas"),
    "gqa/official/eval.py.header-lines49-55.txt": (
        f"{_EVAL}/test_real_gqa.py::test_predictions_in_eval_py_format_score",),
    # VQAv2
    "vqav2/official/v2_OpenEnded_mscoco_val2014_questions.json": (
        f"{_EVAL}/test_real_vqav2.py::test_loader_reads_the_official_question_file",),
    "vqav2/official/OpenEnded_mscoco_train2014_fake_results.json": (
        f"{_EVAL}/test_real_vqav2.py::test_official_results_file_scores",),
    "vqav2/official/mscoco_question_types.txt": (
        f"{_EVAL}/test_real_vqav2.py::test_question_types_break_down_the_score",),
    # Align-Anything
    "align_anything/text_to_text_assets/preference/train.json": (
        f"{_DATA}/test_real_align_anything.py::test_preference_assets_convert",),
    "align_anything/text_to_text_assets/supervised/train.json": (
        f"{_DATA}/test_real_align_anything.py::test_supervised_assets_convert",),
    # AI-hub: notes only (SCHEMA.md), no data; checked against the converter all the same
    # (not a PROVENANCE.md file, so not required here): tests/unit/data/test_real_aihub.py
    # LLaVA mix665k: only a git-lfs pointer is public (no rows)
    "llava_mix665k/llava_v1_5_mix665k.json.git-lfs-pointer": (
        f"{_DATA}/test_real_llava.py::test_lfs_pointer_is_refused_naming_the_real_file",),
}


def readers_for(rel: str) -> tuple[str, ...]:
    """The tests registered for a PROVENANCE.md file (glob patterns match with fnmatch)."""
    from fnmatch import fnmatchcase

    return tuple(t for pattern, tests in READERS.items() if fnmatchcase(rel, pattern)
                 for t in tests)


def test_names(path: Path) -> set[str]:
    """Names of the top-level `test_*` functions of a test module."""
    return set(re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), re.M))


def placeholder_images(root: Path, names: Iterable[str]) -> Path:
    """Write a tiny image at `root/<name>` for each name (JPEG for .jpg/.jpeg, PNG otherwise,
    also for names without a suffix such as SEED-Bench's data ids); returns `root`.

    No real images come with the excerpts: readers that check images exist get these.
    """
    from PIL import Image

    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        Image.new("RGB", (8, 8), (90, 140, 200)).save(path, fmt)
    return root
