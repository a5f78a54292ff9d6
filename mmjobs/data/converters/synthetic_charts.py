"""`synthetic-charts`: random matplotlib charts with a table target and ChartQA-style questions.

The embedded chart-demo's data: no downloads, deterministic per seed, small images for tiny
models. Each chart (a random `ChartTable`: 2-6 short category labels, 1-3 series, values with
0-1 decimals, bar / horizontal bar / line / pie) is drawn once to `images/<chart_id>.png` and
yields a `table` sample and one `qa` sample per applicable question type, e.g.::

    {"id": "synth-s0-000003-chart_type", "images": ["images/synth-s0-000003.png"],
     "conversations": [
        {"role": "user", "content": "<image>\\nWhat type of chart is this?\\n"
                                    "Answer with a single word or number."},
        {"role": "assistant", "content": "horizontal bar"}],
     "meta": {"source": "synthetic-charts", "task": "qa", "question_type": "chart_type",
              "answer": "horizontal bar", "answers": ["horizontal bar", "horizontal bar chart"],
              "chart_type": "hbar", "split": "test", "chart_id": "synth-s0-000003"}}

Options (`ctx.options`): `num` (charts, 100), `seed` (`ctx.seed`), `test_fraction` (0.2; a chart
is held out when a hash of (seed, index) falls below it), `test_split` ("test": the `meta.split`
of held-out charts; "augmented" makes them scorable by `--metric chartqa`, which reads `split`
as ChartQA's human/augmented test set, and synthetic QA is machine-made like "augmented"),
`image_size` (224, or [W, H]),
`kinds` (["table", "qa"]), `question_types` (default all of `QUESTION_TYPES`), `chart_types`
(bar, hbar, line, pie; stacked_bar / stacked_hbar allowed), `value_labels` (True: print values
on the marks so value questions are answerable), `table_prompt`, `answer_hint`.

Chart `i` depends only on (seed, i), so a larger `num` extends a dataset without changing it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

from mmjobs.data.charts import CHART_TYPE_NAMES, CHART_TYPES, ChartTable, Series, format_number
from mmjobs.data.converters import IMAGES_DIR, ConvertContext, register
from mmjobs.data.records import IMAGE_TOKEN, Record, Reject, Sample, Turn

SOURCE = "synthetic-charts"
QUESTION_TYPES = ("chart_type", "num_categories", "num_series", "max_label", "min_label",
                  "value", "max_value", "difference")
DEFAULT_CHART_TYPES = ("bar", "hbar", "line", "pie")
# (title, category axis, value axis, categories in their natural order, series names)
THEMES = (
    ("Fruit sales", "Fruit", "Sales", ("Apple", "Pear", "Plum", "Kiwi", "Lime", "Fig", "Mango"),
     ("2021", "2022", "2023")),
    ("Visitors per day", "Day", "Visitors", ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
     ("Park", "Zoo", "Museum")),
    ("Revenue by region", "Region", "Revenue",
     ("North", "South", "East", "West", "Center", "Coast"), ("Q1", "Q2", "Q3")),
    ("Monthly rainfall", "Month", "Rain", ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul"),
     ("Oslo", "Rome", "Lima")),
    ("Team scores", "Team", "Score", ("Ants", "Bees", "Cats", "Dogs", "Owls", "Foxes"),
     ("Round 1", "Round 2", "Round 3")),
    ("Votes by party", "Party", "Votes", ("Red", "Blue", "Green", "Gold", "Gray", "Teal"),
     ("Men", "Women", "Youth")),
)
_DEFAULTS: dict[str, Any] = {
    "num": 100, "test_fraction": 0.2, "test_split": "test", "image_size": 224,
    "kinds": ["table", "qa"],
    "question_types": list(QUESTION_TYPES), "chart_types": list(DEFAULT_CHART_TYPES),
    "value_labels": True, "table_prompt": "Convert the chart to a markdown table.",
    "answer_hint": "Answer with a single word or number.",
}


def random_table(rng: random.Random, chart_types: list[str] | tuple[str, ...]) -> ChartTable:
    """A random, plausible chart table; values within a series are distinct, so "largest" and
    "smallest" questions have one answer."""
    chart_type = rng.choice(list(chart_types))
    title, x_label, y_label, words, names = rng.choice(THEMES)
    picked = sorted(rng.sample(range(len(words)), rng.randint(2, 6)))
    categories = [words[i] for i in picked]
    num_series = 1 if chart_type == "pie" else rng.randint(1, 3)
    decimals = rng.choice((0, 1))
    top = rng.choice((10, 50, 100, 500))
    series = []
    for name in names[:num_series]:
        values: list[float] = []
        while len(values) < len(categories):
            v = round(rng.uniform(1, top), decimals)
            if v not in values:
                values.append(v)
        series.append(Series(name, values))
    return ChartTable(title, chart_type, categories, series, x_label, y_label)


def split_of(seed: int, index: int, test_fraction: float) -> str:
    """`test` for about `test_fraction` of charts, decided by a hash (stable across runs)."""
    digest = hashlib.sha256(f"{SOURCE}:{seed}:{index}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def questions(table: ChartTable, rng: random.Random,
              types: list[str]) -> Iterator[tuple[str, str, str, list[str]]]:
    """(question_type, question, answer, answers) for each applicable type, in `types` order."""
    single = len(table.series) == 1
    first = table.series[0]
    of = "" if single else f" of {first.name}"
    pairs = list(zip(table.categories, first.values, strict=True))
    for qtype in types:
        if qtype == "chart_type":
            name = CHART_TYPE_NAMES[table.chart_type]
            yield qtype, "What type of chart is this?", name, [name, f"{name} chart"]
        elif qtype == "num_categories":
            n = str(len(table.categories))
            yield qtype, _count_question(table), n, [n]
        elif qtype == "num_series" and table.chart_type != "pie":
            n = str(len(table.series))
            yield qtype, "How many data series are shown?", n, [n]
        elif qtype in ("max_label", "min_label"):
            pick = max if qtype == "max_label" else min
            label = pick(pairs, key=lambda p: p[1])[0]
            word = "largest" if qtype == "max_label" else "smallest"
            yield qtype, f"Which category has the {word} value{of}?", label, [label]
        elif qtype == "value":
            cat, v = rng.choice(pairs)
            text = f"What is the value of {cat}?" if single else \
                f"What is the value of {first.name} for {cat}?"
            yield qtype, text, format_number(v), [format_number(v)]
        elif qtype == "max_value":
            v = format_number(max(first.values))
            yield qtype, f"What is the largest value{of}?", v, [v]
        elif qtype == "difference":
            (a, va), (b, vb) = rng.sample(pairs, 2)
            v = format_number(round(abs(va - vb), 1))
            where = "" if single else f" in {first.name}"
            yield qtype, f"What is the difference between {a} and {b}{where}?", v, [v]


def _count_question(table: ChartTable) -> str:
    if table.chart_type == "pie":
        return "How many slices does the pie chart have?"
    if table.chart_type == "line":
        return "How many points does each line have?"
    return "How many bars are there?" if len(table.series) == 1 else \
        "How many groups of bars are there?"


def _options(ctx: ConvertContext) -> dict[str, Any]:
    """Defaults merged with `ctx.options`; every bad value is reported in one error."""
    unknown = sorted(set(ctx.options) - set(_DEFAULTS) - {"seed"})
    opts = {**_DEFAULTS, "seed": ctx.seed, **ctx.options}
    errors = [f"unknown option {k!r} (known: {', '.join(sorted(_DEFAULTS))}, seed)"
              for k in unknown]
    if not isinstance(opts["num"], int) or opts["num"] < 0:
        errors.append(f"num={opts['num']!r}: use a non-negative integer")
    if not isinstance(opts["test_fraction"], int | float) or not 0 <= opts["test_fraction"] <= 1:
        errors.append(f"test_fraction={opts['test_fraction']!r}: use a number in [0, 1]")
    if not isinstance(opts["test_split"], str) or opts["test_split"] in ("", "train"):
        errors.append(f"test_split={opts['test_split']!r}: use a split name other than 'train'")
    for key, allowed in (("kinds", ("table", "qa")), ("question_types", QUESTION_TYPES),
                         ("chart_types", CHART_TYPES)):
        bad = [v for v in opts[key] if v not in allowed] if isinstance(opts[key], list) else [0]
        if bad or not opts[key]:
            errors.append(f"{key}={opts[key]!r}: use a non-empty list of {', '.join(allowed)}")
    try:
        opts["image_size"] = image_size(opts["image_size"])
    except ValueError as e:
        errors.append(str(e))
    if errors:
        raise ValueError(f"{SOURCE} options: " + "; ".join(errors))
    return opts


def image_size(value: Any) -> tuple[int, int]:
    """`224` or `[W, H]` as a (W, H) pair; raises `ValueError` naming the option."""
    size = [value, value] if isinstance(value, int) else value
    if not (isinstance(size, list | tuple) and len(size) == 2
            and all(isinstance(v, int) and 16 <= v <= 4096 for v in size)):
        raise ValueError(f"image_size={value!r}: use pixels (16..4096) as N or [W, H]")
    return int(size[0]), int(size[1])


def user_turn(prompt: str) -> Turn:
    """The user turn: the image, then the instruction."""
    return Turn(role="user", content=f"{IMAGE_TOKEN}\n{prompt}")


@register(SOURCE, draws_images=True, help="random matplotlib charts: table and QA samples")
def convert(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Draw `num` random charts and yield their table and QA samples (see module docstring)."""
    opts = _options(ctx)
    seed = opts["seed"]
    ctx.output_images.mkdir(parents=True, exist_ok=True)
    for index in range(opts["num"]):
        rng = random.Random(f"{SOURCE}:{seed}:{index}")  # str seeds hash with sha512: stable
        table = random_table(rng, opts["chart_types"])
        chart_id = f"synth-s{seed}-{index:06d}"
        table.draw(ctx.output_images / f"{chart_id}.png", size=opts["image_size"],
                   value_labels=opts["value_labels"])
        images = [f"{IMAGES_DIR}/{chart_id}.png"]
        held_out = split_of(seed, index, opts["test_fraction"]) == "test"
        common = {"source": SOURCE, "chart_type": table.chart_type,
                  "split": opts["test_split"] if held_out else "train", "chart_id": chart_id}
        if "table" in opts["kinds"]:
            markdown = table.to_markdown()
            yield Sample(id=f"{chart_id}-table", images=images, conversations=[
                user_turn(opts["table_prompt"]), Turn(role="assistant", content=markdown)],
                meta={**common, "task": "table", "table_markdown": markdown})
        if "qa" not in opts["kinds"]:
            continue
        hint = f"\n{opts['answer_hint']}" if opts["answer_hint"] else ""
        for qtype, question, answer, answers in questions(table, rng, opts["question_types"]):
            yield Sample(id=f"{chart_id}-{qtype}", images=images, conversations=[
                user_turn(question + hint), Turn(role="assistant", content=answer)],
                meta={**common, "task": "qa", "question_type": qtype, "question": question,
                      "answer": answer, "answers": answers})
