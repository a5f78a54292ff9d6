"""Tiny inputs in each recipe's published layout, and the `--set` overrides that point the
shipped recipe at them (tiny model, few samples, two training steps, short answers).

Each `make_<recipe>(root, model)` writes its files under `root` and returns the overrides;
`mmjobs run RECIPE --set ...` with them runs the real pipeline end to end on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from tests.unit.eval.test_benchmarks import (
    make_chartqa,
    make_mmbench,
    make_scienceqa,
    make_seedbench,
    make_vqav2_test,
)

# Whatever the recipe asks of a GPU cluster, here: fp32, no DeepSpeed, two tiny steps.
SCALE_DOWN = [
    "model.dtype=auto", "model.attn_implementation=auto", "model.trust_remote_code=false",
    "train.max_steps=2", "train.per_device_batch_size=2", "train.grad_accum=1",
    "train.gradient_checkpointing=false", "train.mixed_precision='no'", "train.deepspeed=none",
    "train.dataloader_workers=0", "train.checkpoint_every_steps=0", "train.log_every_steps=1",
    "eval.max_new_tokens=4", "eval.batch_size=8",
]


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format=fmt)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def tiny_model(model: Path) -> list[str]:
    return [f"model.name_or_path={model}", *SCALE_DOWN]


# --------------------------------------------------------------------------- chart-demo


def local_imports(parts: dict[str, Path], hub: dict[str, Path]) -> list[str]:
    """`imports.<name>` overrides that copy local replica folders instead of hub repos; a local
    source takes no hub filters (include, revision), so each entry is replaced whole."""
    return [f"imports.{name}={{source: '{parts[name]}', to: '{hub[name]}'}}" for name in hub]


def chart_demo() -> list[str]:
    """The demo needs no files (it draws its charts and builds its model): just fewer."""
    return [
        "stages.prepare.num=12", "stages.prepare-test.num=3",
        "stages.align.train.max_steps=2", "stages.sft.train.max_steps=2",
        "train.checkpoint_every_steps=1", "train.log_every_steps=1", "eval.max_new_tokens=4",
    ]


# The demo's chart questions on llava-hf: 576 image tokens + a short question and answer.
DEMO_REPLICA_MAX_LENGTH = 640


def chart_demo_on_replica(replica: str = "llava-hf/llava-1.5-7b-hf") -> list[str]:
    """The demo with its make-model step building the replica of a real base model (the
    section is replaced whole: the demo's 56 px tiny-model size does not apply), a
    max_length its 576 image tokens fit, and small batches (598-token samples)."""
    return [*chart_demo(), f"stages.make-model={{replica: {replica}}}",
            f"data.max_length={DEMO_REPLICA_MAX_LENGTH}", "train.per_device_batch_size=2"]


# --------------------------------------------------------------------------- chartwiz


def _aihub_chart(i: int, split: str) -> dict[str, Any]:
    values = [[10 + i, 20 + i, 5 + i]]
    return {"image": [{"filename": f"C_{split}_{i}.jpg", "width": 800, "height": 600}],
            "metadata": {"chart_main": "막대형", "chart_sub": "일반 세로 막대형"},
            "annotations": [{"title": f"지역별 매출 {i}", "unit": "억원",
                             "axis_label": {"x_axis": ["서울", "부산", "대구"], "y_axis": "매출"},
                             "legend": ["매출"], "data_label": values}],
            "description": f"지역별 매출을 나타낸 차트 {i}이다.", "summary": ["부산이 가장 크다."],
            "qa": [{"question": "부산의 매출은?", "answer": str(20 + i)},
                   {"question": "가장 큰 지역은?", "answer": "부산"}]}


CHARTWIZ_PARTS = {"synatra": "maywell/Synatra-7B-v0.3-dpo",
                  "pix2struct": "ybelkada/pix2struct-base"}


def make_chartwiz(root: Path, parts: dict[str, Path]) -> list[str]:
    """AI-hub layout: <split>/text_data/text_<type>/*.json + <split>/img_data/img_<type>/*.jpg.

    The base model is built as the recipe builds it: its `imports:` copy the replicas of
    Synatra-7B-v0.3-dpo and pix2struct-base (`parts`, keyed like CHARTWIZ_PARTS) into a store
    folder under `root`, and its `conversions.base` (kind deplot_llava) composes them there."""
    kind = "vertical bar_standard"
    for split, n in (("train", 4), ("test", 2)):
        for i in range(n):
            write_json(root / split / "text_data" / f"text_{kind}" / f"c{i}.json",
                       _aihub_chart(i, split))
            image(root / split / "img_data" / f"img_{kind}" / f"C_{split}_{i}.jpg",
                  (20 * i, 100, 200), fmt="JPEG")
    sets = {"prepare-align": "train", "prepare": "train", "prepare-test": "test"}
    hub = {name: root / "models" / "hub" / name for name in CHARTWIZ_PARTS}
    composed = root / "models" / "chartwiz-base"
    imports = local_imports(parts, hub)
    return [*imports, f"conversions.base.source={hub['synatra']}",
            f"conversions.base.vision_tower={hub['pix2struct']}",
            f"conversions.base.to={composed}", *tiny_model(composed),
            *(f"stages.{step}.input={root / split}" for step, split in sets.items()),
            "stages.align.train.per_device_batch_size=2", "stages.align.train.grad_accum=1",
            "stages.align.train.epochs=1", "stages.finetune.train.per_device_batch_size=2",
            "stages.pretokenize.workers=1", "stages.pretokenize-align.workers=1"]


# --------------------------------------------------------------------------- chartmoe


def make_chartmoe(root: Path, model: Path, clip: Path) -> list[str]:
    """ChartMoE-Data JSON in its published layout (`<ImageHere>`, user/assistant) with a mix
    file per target, ChartMoE SFT JSON, ChartQA; the base is the InternLM-XComposer2 replica
    (`model`: a remote-code config and one `.bin`), imported into the store and converted by
    the recipe's `conversions.base`, with `clip` the CLIP replica its ViT was built from."""
    data = root / "train"
    targets = {"table": "| year | value |\n| 2019 | {v} |", "json": '{{"2019": {v}}}',
               "code": "plt.bar(['2019'], [{v}])"}
    for target, answer in targets.items():
        rows = []
        for i in range(3):
            rows.append({"id": f"{target}-{i}", "image": [f"images/{target}/{i}.png"],
                         "conversations": [
                             {"from": "user",
                              "value": f"<ImageHere>Convert the chart to {target}."},
                             {"from": "assistant", "value": answer.format(v=10 + i)}]})
            image(data / "images" / target / f"{i}.png", (40 * i, 60, 90))
        write_json(data / "data" / f"chart2{target}.json", rows)
        # `path N`: N x 1000 rows; 0.003 = the three rows (ChartMoE-Data's mix layout).
        (data / "data" / f"{target}_align.txt").write_text(
            f"data/chart2{target}.json 0.003\n")
    rows = []
    for i in range(4):
        rows.append({"id": str(i), "image": [f"sft/{i}.png"], "conversations": [
            {"from": "user", "value": "<ImageHere> What is the highest value?"},
            {"from": "assistant", "value": str(10 + i)}]})
        image(root / "sft" / f"{i}.png", (40 * i, 80, 120))
    write_json(root / "sft.json", rows)
    make_chartqa(root / "ChartQA")
    imported = root.parent / "store-copy" / "xcomposer2-hub"
    converted = root.parent / "store-copy" / "xcomposer2"
    return [*tiny_model(converted),
            f"imports={{base: {{source: '{model}', to: '{imported}'}}}}",
            f"conversions.base.source={imported}", f"conversions.base.vision_tower={clip}",
            f"conversions.base.to={converted}",
            f"stages.prepare-align.image_root={data}",
            *(f"stages.prepare-{t}.input={data / 'data' / f'{t}_align.txt'}" for t in targets),
            f"stages.prepare-sft.input={root / 'sft.json'}",
            f"stages.prepare-sft.image_root={root}",
            f"stages.infer.benchmark_root={root / 'ChartQA'}",
            "train.max_length=2048",
            "stages.pretokenize.max_length=2048", "stages.pretokenize.workers=1",
            "stages.align.train.per_device_batch_size=2", "stages.align.train.grad_accum=1",
            "stages.sft.train.per_device_batch_size=2", "stages.sft.train.grad_accum=1",
            "stages.sft.train.lora.r=4", "stages.sft.train.lora.alpha=8",
            "stages.infer.max_new_tokens=16"]


# --------------------------------------------------------------------------- llava-dataengine


# The hub repos llava-dataengine imports and composes (its `imports:` entries), by entry name.
LLAVA_PARTS = {"vicuna": "lmsys/vicuna-7b-v1.5",
               "clip": "openai/clip-vit-large-patch14-336",
               "projector": "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"}


LONG_ANSWER = " ".join(["The chart is red and the sky is blue."] * 200)


def make_llava_dataengine(root: Path, parts: dict[str, Path]) -> list[str]:
    """mix665k-style and DataEngine JSON over one image root (coco/train2017), plus four of
    the six benchmarks in their official layouts: the three with server upload files
    (SEED-Bench, MMBench, and VQAv2's test-dev/test2015 questions, submitted only) and
    ScienceQA (the table's two figures). MME and GQA are left out to keep the run short now
    that every benchmark runs for the baseline row too: their loaders, LLaVA's prompts and
    metrics are checked in tests/unit/eval, the recipe's MME settings in test_compile.py.

    The base model is built as the recipe builds it: its `imports:` copy the replicas of
    vicuna-7b-v1.5, CLIP-336 and the pretrain projector (`parts`, keyed like LLAVA_PARTS) into
    a store folder under `root`, and its `conversions.base` composes them into a transformers
    LLaVA there (`model.name_or_path` follows `conversions.base.to`)."""
    data = root / "playground" / "data"
    for image_id in (1, 2, 3):
        image(data / "coco" / "train2017" / f"{image_id:012d}.jpg", (60 * image_id, 0, 0),
              fmt="JPEG")
    write_json(root / "llava_mix.json", [
        {"id": f"l{i}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"},
            {"from": "gpt", "value": "It is red."}]} for i in (1, 2, 3)] + [
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"},
                                              {"from": "gpt", "value": "Hello."}]},
        # Past max_length (2048) with its image: LLaVA (and the recipe) truncates the text.
        {"id": "long", "image": "coco/train2017/000000000001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it at length."},
            {"from": "gpt", "value": LONG_ANSWER}]}])
    write_json(root / "dataengine.json", [
        {"image_id": i, "question": "What is in the picture?", "choices": ["a cat", "a dog"],
         "correct_choice_idx": i % 2, "rationales": []} for i in (1, 2, 3)])
    benchmarks = {"seedbench": make_seedbench, "mmbench": make_mmbench,
                  "scienceqa": make_scienceqa, "vqav2": make_vqav2_test}
    for name, make in benchmarks.items():
        make(root / name)
    hub = {name: root / "models" / "hub" / name for name in LLAVA_PARTS}
    composed = root / "models" / "llava-v1.5-7b-pretrain"
    imports = local_imports(parts, hub)
    return [*imports, f"conversions.base.source={hub['vicuna']}",
            f"conversions.base.vision_tower={hub['clip']}",
            f"conversions.base.projector={hub['projector'] / 'mm_projector.bin'}",
            f"conversions.base.to={composed}", *tiny_model(composed),
            f"stages.prepare-llava.input={root / 'llava_mix.json'}",
            f"stages.prepare-llava.image_root={data}",
            f"stages.prepare-dataengine.input={root / 'dataengine.json'}",
            f"stages.prepare-dataengine.image_root={data}",
            "stages.prepare-llava.image_workers=2", "stages.prepare-dataengine.image_workers=2",
            "stages.pretokenize.workers=1",
            f"eval.benchmarks=[{','.join(benchmarks)}]",
            *(f"stages.infer-{name}.benchmark_root={root / name}" for name in benchmarks)]


# --------------------------------------------------------------------------- lavin-sweep


def make_lavin_sweep(root: Path) -> list[str]:
    """ScienceQA's problems.json / pid_splits.json / images, and the replicas of LaVIN's parts
    (Meta-format LLaMA, 224 px CLIP) that the recipe's conversions.lavin step joins into the
    LaVIN every setting (all eight of the recipe) trains on."""
    from mmjobs.models.replicas import build_replica

    parts = {}
    for name in ("meta/llama-7b", "openai/clip-vit-large-patch14"):
        parts[name] = root / "replicas" / name.replace("/", "--")
        build_replica(name, parts[name])
    sqa = make_scienceqa(root / "scienceqa")
    problems = json.loads((sqa / "problems.json").read_text())
    splits = json.loads((sqa / "pid_splits.json").read_text())
    for pid in ("2", "3"):  # more training rows than the benchmark fixture's one
        problems[pid] = {**problems["1"], "question": f"Which word rhymes? ({pid})"}
        splits["train"].append(pid)
    write_json(sqa / "problems.json", problems)
    write_json(sqa / "pid_splits.json", splits)
    lavin = root / "models" / "lavin"
    return [*tiny_model(lavin), f"data.input={sqa}",
            f"conversions.lavin.source={parts['meta/llama-7b']}",
            f"conversions.lavin.vision_tower={parts['openai/clip-vit-large-patch14']}",
            f"conversions.lavin.to={lavin}",
            f"stages.prepare.image_root={sqa / 'images'}",
            f"stages.prepare-test.input={sqa}",
            f"stages.prepare-test.image_root={sqa / 'images'}",
            "train.max_steps=1", "stages.pretokenize.workers=1"]


# --------------------------------------------------------------------------- chameleon-interleaved


TOO_MANY_IMAGES = "four-images"


def make_chameleon_interleaved(root: Path, judge_url: str, model: Path) -> list[str]:
    """Align-Anything layouts (TI2TI SFT rows whose responses hold an image, preference pairs,
    prompt-only rows), the base `model` (the AA-chameleon-7b-base replica: 1,024 VQ tokens per
    512 px image; imported by the recipe's `imports`, as its baseline too) and a judge at
    `judge_url` (an OpenAI-compatible server). The recipe's own
    max_length (4096) and anything_ti2ti format apply. Preference responses are text only:
    until the model loader lifts upstream's image-logit mask, an image in a DPO response has
    log-prob -inf (the image-token learning test applies the lift itself)."""
    colours = {"red": (230, 20, 20), "blue": (20, 40, 230)}
    for name, rgb in colours.items():
        image(root / f"{name}.png", rgb)
    sft = [{"id": f"{name}-{i}", "question": f"Draw a {name} square.", "image_url": [],
            "response": f"Here is a {name} square:", "output_image_url": f"{name}.png"}
           for name in colours for i in range(2)]
    # Four images of 1,026 tokens cannot fit the recipe's 4096: a too_long reject, not a crash.
    sft.append({"id": TOO_MANY_IMAGES, "question": "Compare these three.",
                "image_url": ["red.png", "blue.png", "red.png"], "response": "This one:",
                "output_image_url": "blue.png"})
    pairs = [{"question": "What colour is this?", "image": f"{name}.png",
              "response_1": f"It is {name}.", "response_2": "I cannot tell.",
              "better_response_id": 1} for name in colours for _ in range(2)]
    prompts = [{"question": f"Describe and redraw this {name} picture.", "image": f"{name}.png"}
               for name in colours]
    for name, rows in (("sft", sft), ("preference", pairs), ("prompts", prompts)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = {"prepare-sft": "sft", "prepare-preference": "preference",
             "prepare-prompts": "prompts", "prepare-test": "prompts"}
    # The recipe's imports, from the replica: the base, and as the baseline (Anole-7b at full
    # size) a second copy of it.
    store = root.parent / "store-copy"
    base, baseline = store / "AA-chameleon-7b-base", store / "baseline"
    return [
        f"imports={{base: {{source: '{model}', to: '{base}'}}, "
        f"baseline: {{source: '{model}', to: '{baseline}'}}}}",
        f"stages.infer-baseline.model={baseline}",
        *tiny_model(base),
        # A 1,026-token image would take minutes to sample on CPU: short text answers.
        "eval.max_new_tokens=8",
        *(f"stages.{step}.input={root / name}.jsonl" for step, name in steps.items()),
        "stages.pretokenize.workers=1",
        "stages.dpo.train.deepspeed=none", "stages.ppo.train.deepspeed=none",
        "stages.ppo.train.rl.rollout_batch_size=2", "stages.ppo.train.rl.max_new_tokens=8",
        f"stages.evaluate.judge.base_url={judge_url}", "stages.evaluate.judge.model=judge-1",
        "stages.evaluate.judge.requests_per_minute=null",
    ]
