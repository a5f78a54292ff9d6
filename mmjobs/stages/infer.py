"""Stage `infer`: generate answers for a canonical dataset or a benchmark -> predictions JSONL.

    python -m mmjobs.stages.infer --set model=s3://runs/x/merge --set benchmark=chartqa \\
        --set benchmark_root=s3://data/ChartQA --set 'benchmark_options={"split": "test"}'
    python -m mmjobs.stages.infer --set model=s3://models/llava --set adapter=s3://runs/x/train \\
        --set dataset=s3://runs/x/prepare --set split=test

Prompts come from a committed canonical dataset or a benchmark (`mmjobs.eval.prompts`). The
committed output holds `predictions.jsonl` (one row per prompt, in source order: `id`,
`prompt`, `prediction`, then `answers`/`gt` and the prompt's fields, which `mmjobs score`
reads) and `infer.json` (counts, seconds, tokens/s). `modalities: [text, image]` lets answers
of image-token models (Chameleon) contain images, written as PNGs under `images/`
(`mmjobs.eval.interleaved`). `submission: true` (benchmarks vqav2, mmbench, seedbench) also
writes the evaluation server's upload file under `submission/` (`mmjobs.eval.submission`: every
question of the benchmark's files, "" or an empty cell where unanswered; its counts go into
infer.json). Resumable: answered rows survive a kill or SIGTERM, and a restart
with the same row-shaping settings answers only the other ids (`mmjobs.eval.predictions`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from mmjobs import signals, storage
from mmjobs.data.conversation import FORMAT_HELP, ConversationFormatName
from mmjobs.eval.endpoint import AgreementError, EndpointConfig, EndpointError
from mmjobs.image_backend import image_backend
from mmjobs.layout import INFER_SUMMARY, PREDICTIONS_FILE
from mmjobs.logs import get_logger
from mmjobs.recipe import RecipeConfig, conversation_format_defaults, remote_code_defaults
from mmjobs.stage_contract import (
    RUN_FIELDS,
    Input,
    Knob,
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    input_fingerprint,
    run_stage,
)

NAME = "infer"
SUBMITTABLE = ("vqav2", "mmbench", "seedbench")  # mmjobs.eval.submission.WRITERS
# Bump when rows or the output layout change: invalidates cached and partial outputs.
# 2: conversation formats (content-part templates no longer repeat the "\n" after an image).
# 3: large JPEGs decode at the processor's scale; the image backend is part of the key.
VERSION = 3
log = get_logger(__name__)
# Prompts whose images are loaded and handed to the generator together: enough for its length
# sorting to pay off, few enough that the decoded images of a window fit in memory.
_WINDOW_BATCHES = 8
# Fields that change no row: where output goes, how it is tracked, how fast it is made (model,
# adapter and dataset enter by content; limit and split pick rows only).
_NOT_IN_ROWS = RUN_FIELDS | {"model", "adapter", "dataset", "batch_size", "upload_every_seconds",
                             "limit", "split", "submission"}
SUBMISSION_DIR = "submission"


class InferConfig(StageConfig):
    """Generate predictions for a canonical dataset or a benchmark with a (LoRA) model."""

    model: str = Field(description="Model URI: local dir, s3:// committed dir or hub id; the "
                       "base model when `adapter` is set.")
    adapter: str | None = Field(None, description="LoRA adapter dir, or a training output "
                                "holding final/adapter (local or s3://).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto: bfloat16 on GPUs that support it, else float32.")
    dataset: str | None = Field(None, description="Committed canonical dataset (sample or "
                                "prompt records). Give this or `benchmark`.")
    split: str | None = Field(None, description="Dataset only: keep records whose meta.split "
                              "equals this (e.g. test).")
    benchmark: str | None = Field(None, description="Benchmark name for "
                                  "mmjobs.eval.benchmarks.load_benchmark (e.g. chartqa).")
    benchmark_root: str | None = Field(None, description="The benchmark's files in their "
                                       "official layout (local or s3://). Not fingerprinted: "
                                       "set force=true after changing them in place.")
    benchmark_options: dict[str, Any] = Field(default_factory=dict,
                                              description="Loader options (see the loader).")
    limit: int | None = Field(None, ge=1, description="Answer only the first N prompts.")
    prompt_suffix: str = Field("", description="Appended to each prompt's last user turn, e.g. "
                               "a program-of-thought instruction.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch; higher is "
                            "faster until memory runs out.")
    max_new_tokens: int = Field(64, ge=1, description="Generation length cap per answer.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    num_beams: int = Field(1, ge=1, description="Beam search width; 1 is no beam search.")
    stop_strings: list[str] = Field(default_factory=list, description="Stop an answer at any "
                                    "of these; the answer is trimmed before it.")
    conversation_format: ConversationFormatName = Field(
        "auto", description="How prompts are rendered (as pretokenize rendered the training "
        "data): auto/template = the model's chat template; built-in formats for models "
        f"without one: {FORMAT_HELP}. A format adds its own stops (e.g. </s>).")
    seed: int = Field(0, description="Sampling seed, set at the start of every window of 8 "
                      "batches.")
    upload_every_seconds: float = Field(60.0, ge=0, description="s3:// outputs: upload the "
                                        "partial predictions at most this often (work since "
                                        "the last upload is redone after a kill).")
    modalities: list[Literal["text", "image"]] = Field(
        default_factory=lambda: ["text"], description="What answers may contain. [text, image]: "
        "image-token models (Chameleon) also generate images, saved as PNGs under images/ "
        "next to the predictions (see mmjobs.eval.interleaved).")
    max_output_images: int = Field(1, ge=1, description="modalities with image: images one "
                                   "answer may contain.")
    endpoint: EndpointConfig | None = Field(None, description="Answer through this "
                                            "OpenAI-compatible server (vLLM, SGLang, TGI, "
                                            "mmjobs serve) instead of in-process; `model` and "
                                            "`adapter` still name what it serves (they key the "
                                            "output, and the agreement check loads them).")
    vq_decoder: str | None = Field(None, description="modalities with image: where the VQ "
                                   "image decoder weights are (model dir or .safetensors file); "
                                   "default the model. Set it to the base model for fully "
                                   "fine-tuned or merged models, which are saved without it.")

    submission: bool = Field(False, description="Also write the evaluation server's upload file "
                             "(vqav2 test splits: EvalAI JSON; mmbench: xlsx; seedbench: JSONL) "
                             "under submission/, as LLaVA-1.5's convert_*_for_submission.py do.")

    @model_validator(mode="after")
    def _check_source(self) -> InferConfig:
        problems = []
        if self.submission and self.benchmark not in SUBMITTABLE:
            problems.append(f"submission applies to the benchmarks {', '.join(SUBMITTABLE)} "
                            f"(evaluation-server formats), not {self.benchmark or 'a dataset'}; "
                            "set submission=false")
        if (self.dataset is None) == (self.benchmark is None):
            problems.append("give exactly one of `dataset` (a canonical dataset URI) and "
                            "`benchmark` (a benchmark name)")
        if self.benchmark is not None and self.benchmark_root is None:
            problems.append(f"benchmark={self.benchmark!r} needs `benchmark_root`, the folder "
                            "holding its files")
        if self.dataset is not None and (self.benchmark_root or self.benchmark_options):
            problems.append("benchmark_root/benchmark_options apply to `benchmark` only; remove "
                            "them or use benchmark instead of dataset")
        if self.benchmark is not None and self.split is not None:
            problems.append("`split` filters datasets; for a benchmark use its own option, "
                            "e.g. benchmark_options.split")
        if "text" not in self.modalities or len(set(self.modalities)) != len(self.modalities):
            problems.append(f"modalities {self.modalities}: list text, and image for answers "
                            "that may contain images, each once")
        if self.endpoint is not None and (self.interleaved or self.num_beams > 1
                                          or self.top_k):
            problems.append("endpoint: servers answer text with greedy or top-p sampling; "
                            "remove modalities image / num_beams / top_k, or the endpoint")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def interleaved(self) -> bool:
        """Answers may contain images (`modalities` lists image)."""
        return "image" in self.modalities


class InferResult(StageResult):
    """Where the predictions are and how they were made."""

    predictions: str
    rows: int
    answered: int
    resumed: int
    seconds: float
    tokens_per_second: float | None


def main(cfg: InferConfig) -> InferResult:
    """Run the stage; see the module docstring."""
    from mmjobs.eval.predictions import (
        PartialPredictions,
        answer_all,
        run_summary,
        write_predictions,
    )
    from mmjobs.eval.prompts import iter_items

    row_fp = _rows_fingerprint(cfg)
    # The upload file is an output of its own: fingerprinted only when asked for, so other
    # infer outputs keep their fingerprints.
    fp = fingerprint(NAME, row_fp, cfg.limit, cfg.split, *(["submission"] if cfg.submission
                                                           else []))
    source = cfg.dataset or f"benchmark {cfg.benchmark} at {cfg.benchmark_root}"

    def infer(stage: StageRun) -> dict[str, Any]:
        start = time.monotonic()
        partial = PartialPredictions(stage.out, row_fp, upload_every=cfg.upload_every_seconds,
                                     version=VERSION, name=NAME)
        try:
            with signals.sigterm_exits():
                rows, order, stats = answer_all(
                    iter_items(cfg), partial, lambda: _generator(cfg),
                    window_size=_WINDOW_BATCHES * cfg.batch_size, desc=NAME,
                    image_out=stage.out if cfg.interleaved else None)
        except BaseException:
            partial.close(upload=True)  # keep what was answered for the restart
            raise
        partial.close(upload=False)
        summary = {**run_summary(order, stats, time.monotonic() - start), "model": cfg.model,
                   "adapter": cfg.adapter, "source": source}
        if cfg.endpoint is not None:
            summary["endpoint"] = {"url": cfg.endpoint.url,
                                   "agreement": _agreement(cfg, rows, order)}
        with stage.commit({"stage": NAME, "rows": len(order)}) as scratch:
            # Interleaved answers: the PNGs written next to the rows go into the commit.
            images = write_predictions(scratch, rows, order,
                                       images_from=stage.out if cfg.interleaved else None)
            if images is not None:
                summary["output_images"] = images
            if cfg.submission:
                summary["submission"] = _submission(cfg, rows, scratch)
            (scratch / INFER_SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
            stage.run.log_artifact(scratch / INFER_SUMMARY)
        partial.discard()  # after the commit: a crash before it still has the rows
        stage.run.log_metrics({k: float(v) for k, v in summary.items()
                               if isinstance(v, int | float) and not isinstance(v, bool)})
        log.info("%s: %d predictions (%d answered now, %d resumed) -> %s", NAME, len(order),
                 stats["answered"], stats["resumed"], stage.out)
        return summary

    def reused(out: str, manifest: storage.Manifest, run: Any) -> dict[str, Any]:
        return json.loads(storage.read_text(storage.join(out, INFER_SUMMARY)))

    # An older output made from other inputs must not look current while this one runs.
    return run_stage(cfg, NAME, fp, infer, result=_result, reused=reused,
                     tags={"source": source}, uncommit_first=True)


def _agreement(cfg: InferConfig, rows: dict[str, dict[str, Any]],
               order: list[str]) -> dict[str, Any] | None:
    """The endpoint's answers against the in-process model's on the first
    `endpoint.agreement_sample` prompts; raises `AgreementError` beyond the tolerance."""
    import itertools

    from mmjobs.eval.endpoint import check_agreement
    from mmjobs.eval.generate import PromptInput, load_image
    from mmjobs.eval.prompts import iter_items

    assert cfg.endpoint is not None
    if not cfg.endpoint.agreement_sample:
        return None
    items = list(itertools.islice(iter_items(cfg), cfg.endpoint.agreement_sample))
    generator = _generator(cfg.model_copy(update={"endpoint": None}))
    local = generator.generate([PromptInput(i.prompt, [load_image(u, generator.image_min_edge)
                                                       for u in i.images]) for i in items])
    report = check_agreement([i.id for i in items], [rows[i.id]["prediction"] for i in items],
                             local, cfg.endpoint.agreement_tolerance)
    log.info("%s: the endpoint agrees with the in-process model on %d of %d sampled rows",
             NAME, report["sample"] - report["differ"], report["sample"])
    return report


def _submission(cfg: InferConfig, rows: dict[str, dict[str, Any]], scratch: Any) -> dict[str, Any]:
    """The server upload file under submission/ (see mmjobs.eval.submission); its summary."""
    from mmjobs.eval.submission import write_submission

    # benchmark and benchmark_root are set: the config refuses submission without them.
    summary = write_submission(str(cfg.benchmark), str(cfg.benchmark_root),
                               cfg.benchmark_options, rows, scratch / SUBMISSION_DIR)
    summary["file"] = f"{SUBMISSION_DIR}/{summary['file']}"
    log.info("%s: %s for the %s server: %d questions, %d answered, %d unanswered", NAME,
             summary["file"], cfg.benchmark, summary["questions"], summary["answered"],
             summary["unanswered"])
    return summary


def _generator(cfg: InferConfig) -> Any:
    from mmjobs.eval.generate import Generator, load_for_inference

    if cfg.endpoint is not None:
        from mmjobs.eval.endpoint import EndpointGenerator

        return EndpointGenerator(cfg.endpoint, batch_size=cfg.batch_size,
                                 max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                 temperature=cfg.temperature, top_p=cfg.top_p,
                                 stop_strings=cfg.stop_strings, seed=cfg.seed)

    loaded = load_for_inference(cfg.model, cfg.adapter, trust_remote_code=cfg.trust_remote_code,
                                dtype=cfg.dtype, conversation_format=cfg.conversation_format)
    options = dict(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                   do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, num_beams=cfg.num_beams, stop_strings=cfg.stop_strings,
                   seed=cfg.seed)
    if cfg.interleaved:
        from mmjobs.eval.interleaved import InterleavedGenerator

        return InterleavedGenerator(loaded, vq_decoder=cfg.vq_decoder,
                                    max_images=cfg.max_output_images, **options)
    return Generator(loaded, **options)


def _rows_fingerprint(cfg: InferConfig) -> str:
    """Hash of everything that shapes a row: model + adapter contents, source, settings."""
    from mmjobs.models.model_dirs import dir_fingerprint, locate_adapter, model_fingerprint

    adapter = dir_fingerprint(locate_adapter(cfg.adapter)) if cfg.adapter else None
    dataset = input_fingerprint(cfg.dataset) if cfg.dataset else None
    # Text-only runs hash as before the interleaved settings existed (their rows are the same).
    image = ({"vq_decoder"} if cfg.interleaved else
             {"modalities", "max_output_images", "vq_decoder"})
    decoder = []
    if cfg.interleaved and cfg.vq_decoder:
        decoder = [input_fingerprint(cfg.vq_decoder) if cfg.vq_decoder.endswith(".safetensors")
                   else model_fingerprint(cfg.vq_decoder)]
    settings = cfg.model_dump(exclude=_NOT_IN_ROWS | image)
    if cfg.endpoint is None:
        settings.pop("endpoint")  # in-process runs hash as before the endpoint existed
        # The two image-processor backends give slightly different pixels.
        settings["image_backend"] = image_backend()
    else:  # which server answers shapes rows; how hard the client pushes it does not
        endpoint = settings["endpoint"]
        settings["endpoint"] = ({"engine": endpoint["engine"], "model": endpoint["model"]}
                                if endpoint.get("engine") else
                                {k: endpoint[k] for k in ("url", "model")})
    return fingerprint(NAME, VERSION, settings,
                       model_fingerprint(cfg.model), adapter, dataset, *decoder)


def _result(out: str, summary: dict[str, Any], cached: bool, run_id: str | None) -> InferResult:
    return InferResult(output=out, cached=cached, mlflow_run_id=run_id,
                       predictions=storage.join(out, PREDICTIONS_FILE), rows=summary["rows"],
                       answered=summary["answered"], resumed=summary["resumed"],
                       seconds=summary["seconds"], tokens_per_second=summary["tokens_per_second"])


def recipe_defaults(recipe: RecipeConfig, step: str) -> dict[str, Any]:
    """The recipe's `eval` section (batch size, answer length) and the model's dtype."""
    return {"batch_size": recipe.eval.batch_size, "max_new_tokens": recipe.eval.max_new_tokens,
            **({"dtype": recipe.model.dtype} if recipe.model.dtype != "auto" else {}),
            **remote_code_defaults(recipe), **conversation_format_defaults(recipe)}


# An empty `dataset` or `adapter` is not wired: the config decides.
STAGE = Stage(name=NAME, config=InferConfig, result=InferResult, main=main, image="eval",
              gpu=True, resumable=True, errors=(EndpointError, AgreementError),
              # endpoint_url: the URL of the engine a pipeline starts (eval.engine).
              inputs=(Input("model"), Input("dataset", default=""), Input("adapter", default=""),
                      Input("endpoint_url", path="endpoint.url", default="",
                            placeholder="http://engine.wired-by-the-pipeline/v1")),
              recipe_defaults=recipe_defaults,
              knobs=(Knob("limit", int, unset=0, description="Answer only the first N prompts "
                          "(0: all)."),))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
