"""`chartqa`: the ChartQA test sets (human and augmented), scored by `--metric chartqa`.

Official layout (vis-nlp/ChartQA, as ChartMoE's `eval_ChartQA.py` reads it)::

    <root>/test/test_human.json      [{"imgname": "41699051005347.png", "query": "...",
    <root>/test/test_augmented.json    "label": "13"}, ...]
    <root>/test/png/<imgname>

Items: id `"<split>-<position in the file>"`, one image, fields `answers` (`[label]`) and
`split` (`human` | `augmented`).

Prompts are ChartMoE's (IDEA-FinAI/ChartMoE `chartmoe/eval_ChartQA.py::ChartQATester`, the
user text inside its InternLM-XComposer2 chat template), with `<image>` in front:

- default: "Answer the question using a single word or phrase. {question}";
- `pot: true`: program-of-thought prompt `pot_prompt` (ChartMoE's `--pot_idx`): 0 = "Please give
  the program of thought. {question}", 1 (default, the one ChartMoE's README reports) = "Please
  give the program of thought in python code. Use print function to output the answer in the
  end. {question}". Score such predictions with the evaluate stage's `pot: true`, which runs the
  programs in the sandbox.

The two files are serialised differently (`test_human.json` is one line, `test_augmented.json`
is TAB-indented); both are streamed. Labels stay strings ("0.57", "Yes"), and image names are
used verbatim (`01499440003158.png` keeps its leading zero).

Options: `splits` (default both), `prompt_template` (overrides either prompt; must contain
`{question}`), `pot`, `pot_prompt`, `image_dir` (default `test/png` under root; or an absolute
path / `s3://` prefix), `limit` (per split).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Literal

from pydantic import Field, field_validator

from mmjobs import storage
from mmjobs.eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    require_files,
    stream_json,
    with_image_tokens,
)

SPLITS = ("human", "augmented")
LAYOUT = "test/test_human.json, test/test_augmented.json, test/png/"
# ChartMoE eval_ChartQA.py: self.prompt and pot_prompts[0], pot_prompts[1] (user text only).
CHARTMOE_PROMPT = "Answer the question using a single word or phrase. {question}"
CHARTMOE_POT_PROMPTS = (
    "Please give the program of thought. {question}",
    "Please give the program of thought in python code. Use print function to output the "
    "answer in the end. {question}",
)


class ChartQAOptions(BenchmarkOptions):
    """Options of the `chartqa` loader."""

    splits: list[Literal["human", "augmented"]] = Field(
        default_factory=lambda: list(SPLITS), min_length=1, description="Test sets to load.")
    prompt_template: str | None = Field(
        None, description="User text with a {question} placeholder; default ChartMoE's prompt "
        "(or its PoT prompt with pot: true).")
    pot: bool = Field(False, description="Ask for a Python program (program of thought).")
    pot_prompt: Literal[0, 1] = Field(1, description="ChartMoE's --pot_idx: which PoT prompt.")
    image_dir: str = Field("test/png", description="Chart images: a folder under root, or an "
                           "absolute path / s3:// prefix.")

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, value: str | None) -> str | None:
        if value is not None and "{question}" not in value:
            raise ValueError("must contain the {question} placeholder, e.g. "
                             "'{question} Answer briefly.'")
        return value


def template(opts: ChartQAOptions) -> str:
    """The user-text template these options select."""
    if opts.prompt_template is not None:
        return opts.prompt_template
    return CHARTMOE_POT_PROMPTS[opts.pot_prompt] if opts.pot else CHARTMOE_PROMPT


def load(root: str, opts: ChartQAOptions) -> Iterator[BenchmarkItem]:
    """Check the layout, then stream the items of each requested split (see module doc)."""
    required = [f"test/test_{s}.json" for s in opts.splits]
    if storage.is_s3(opts.image_dir) or opts.image_dir.startswith("/"):
        image_dir = str(storage.parse(opts.image_dir)).rstrip("/")
        parent, name = image_dir.rsplit("/", 1)
        require_files("ChartQA", parent, [name + "/"], LAYOUT)
    else:
        image_dir = storage.join(root, opts.image_dir)
        required.append(opts.image_dir.rstrip("/") + "/")
    require_files("ChartQA", root, required, LAYOUT)
    return _items(root, opts, template(opts), image_dir)


def _items(root: str, opts: ChartQAOptions, text: str, image_dir: str
           ) -> Iterator[BenchmarkItem]:
    for split in opts.splits:
        uri = storage.join(root, "test", f"test_{split}.json")
        for n, row in enumerate(islice(stream_json(uri, "item"), opts.limit)):
            if not isinstance(row, dict) or not all(k in row for k in ("imgname", "query",
                                                                        "label")):
                raise BenchmarkError(f"{uri}: entry {n} lacks imgname/query/label: {row!r:.200}")
            image = storage.join(image_dir, str(row["imgname"]))
            # str.replace, not str.format: braces in a question or template stay literal.
            prompt = text.replace("{question}", str(row["query"]))
            yield BenchmarkItem(id=f"{split}-{n}", prompt=with_image_tokens(prompt, 1),
                                images=[image],
                                fields={"answers": [str(row["label"])], "split": split})


BENCHMARK = Benchmark(name="chartqa", title="ChartQA", metric="chartqa", options=ChartQAOptions,
                      load=load, layout=LAYOUT)
