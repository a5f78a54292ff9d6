"""Stage `pretokenize`: canonical dataset -> Parquet shards of input_ids/labels (+ image bytes).

    python -m mmjobs.stages.pretokenize --set dataset=s3://b/ds --set model=s3://b/models/llava \
        --set max_length=2048 --set workers=8

The output is content-addressed: `{cache_root}/{fingerprint}` where the fingerprint covers the
dataset (and image root) contents, the processor files, the chat template, the transformers
version and the options that change the shards. An identical re-run is a cache hit (no work,
`cached=True`); an interrupted run resumes from its finished shards. Set `output` to write
somewhere else instead. See `mmjobs.data.pretokenize` for the work and
`mmjobs.data.pretokenized` for the format. A `kind: preference` dataset gives preference
shards (chosen and rejected sequences per row) for the train stage's dpo and rm modes.

`fan_out: N` (in a pipeline) spreads the shards over N CPU pods: the pipeline runs N tasks
with `part` 0..N-1 (each encodes shards i with i % N == part, commits nothing), then this
step without `part`, which finds every shard done and commits the same entry a single pod
would have written. Only that last task exposes the `shards` Dataset artifact (the parts'
component declares none: the entry is not complete while they run). Run alone, the stage
ignores `fan_out` and encodes every shard itself.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from pydantic import Field, model_validator

from mmjobs import settings, storage
from mmjobs.data.conversation import FORMAT_HELP, ConversationFormatName, NoChatTemplateError
from mmjobs.image_backend import processor_kwargs
from mmjobs.logs import get_logger
from mmjobs.recipe import RecipeConfig, conversation_format_defaults, remote_code_defaults
from mmjobs.stage_contract import (
    Input,
    Stage,
    StageConfig,
    StageResult,
    fingerprint,
    input_fingerprint,
    reusable_output,
    stage_tracking,
)

NAME = "pretokenize"
# Bump when the shard contents change for the same inputs. 2: conversation formats; BOS added
# for templates that do not write it (llava-hf's). 3: shards under data/, Image-typed images,
# README.md (an earlier cache entry has the old layout and must not be reused as this one).
FORMAT_VERSION = 3
log = get_logger(__name__)


class PretokenizeConfig(StageConfig):
    """Pre-tokenize a canonical dataset with a model's processor and chat template."""

    dataset: str = Field(description="URI of a committed canonical dataset (samples.jsonl, "
                                     "dataset.json with image_root).")
    model: str = Field(description="Model/processor: a local directory or an s3:// committed "
                                   "directory (only processor files are fetched, plus VQ "
                                   "weights for image-token models).")
    max_length: int = Field(2048, ge=8, le=1_048_576,
                            description="Token budget per sample, image tokens included. "
                                        "Longer samples are rejected (`too_long`) unless "
                                        "`truncate` is on.")
    truncate: bool = Field(False, description="Cut the text after the last image at "
                           "max_length (labels too), as LLaVA cuts at model_max_length, "
                           "instead of rejecting the sample; images are never cut (a sample "
                           "whose image tokens do not fit is still a too_long reject).")
    conversation_format: ConversationFormatName = Field(
        "auto", description="How conversations become text: auto/template = the model's chat "
        f"template; built-in formats for models without one: {FORMAT_HELP}.")
    workers: int = Field(1, ge=1, le=512, description="Worker processes (1 = in-process). "
                                                      "Does not change the output.")
    shard_size: int = Field(1000, ge=1, le=1_000_000,
                            description="Input rows per shard: the unit of parallelism and of "
                                        "resume; larger shards mean fewer files and more "
                                        "memory per worker.")
    cache_root: str | None = Field(None, description="Where outputs are cached; default "
                                                     "{store_root}/cache/pretokenized.")
    trust_remote_code: bool = Field(False, description="Run processor code shipped with the "
                                                       "model (InternLM-XComposer2 needs it).")
    fan_out: int = Field(1, ge=1, le=256, description="In a pipeline: pods sharing the shards "
                         "(N part tasks, then one that commits). Does not change the output.")
    part: int | None = Field(None, ge=0, description="Set by the pipeline for a fan-out task: "
                             "encode shards i with i % fan_out == part and commit nothing.")

    @model_validator(mode="after")
    def _part_in_range(self) -> PretokenizeConfig:
        if self.part is not None and self.part >= self.fan_out:
            raise ValueError(f"part: {self.part} is not below fan_out ({self.fan_out}); parts "
                             "are 0..fan_out-1 (set by the pipeline: remove it)")
        return self


class PretokenizeResult(StageResult):
    """Where the shards are and what they hold (`output` is the committed directory)."""

    fingerprint: str
    rows_in: int
    rows_written: int
    rows_rejected: int
    shards: int
    tokens: int
    shards_reused: int = Field(0, description="Shards kept from an interrupted earlier run.")
    seconds: float = 0.0
    part: int | None = Field(None, description="The fan-out part this task encoded (its "
                             "counts are that part's; nothing committed), or None.")


def main(cfg: PretokenizeConfig) -> PretokenizeResult:
    """Run (or reuse) the pre-tokenization described by `cfg`."""
    from mmjobs.data import pretokenized
    from mmjobs.data.pretokenize import PretokenizeJob, pretokenize, resolve_image_root
    from mmjobs.data.processor_files import materialize_model
    from mmjobs.data.records import CARD_FILE, read_json

    start = time.monotonic()
    storage.read_manifest(cfg.dataset)  # fail fast: an uncommitted dataset is incomplete
    model_dir, processor_fp = materialize_model(cfg.model)
    dataset_fp = input_fingerprint(cfg.dataset)
    image_root = resolve_image_root(cfg.dataset, read_json(storage.join(cfg.dataset, CARD_FILE)))
    # Images outside the dataset directory are not covered by its manifest.
    inside = (image_root.rstrip("/") + "/").startswith(cfg.dataset.rstrip("/") + "/")
    image_fp = None if inside else input_fingerprint(image_root)
    fp = fingerprint(NAME, FORMAT_VERSION, dataset_fp, image_fp, processor_fp,
                     _chat_and_versions(model_dir, cfg.trust_remote_code),
                     cfg.max_length, cfg.shard_size, cfg.conversation_format, cfg.truncate)
    if cfg.output and cfg.cache_root:
        log.warning("pretokenize: both output and cache_root are set; writing to output=%s",
                    cfg.output)
    out = cfg.output or storage.join(cfg.cache_root or _default_cache_root(), fp)
    meta = {"model": cfg.model, "processor_fingerprint": processor_fp,
            "dataset_fingerprint": dataset_fp}

    tags = {"pretokenize.output": out,
            **({"pretokenize.part": f"{cfg.part}/{cfg.fan_out}"} if cfg.part is not None else {})}
    with stage_tracking(cfg, NAME, tags=tags) as run:
        cached = reusable_output(out, fp, cfg.force) is not None
        reused = 0
        if cached:
            log.info("pretokenize: cache hit, %s already holds these inputs (fingerprint %s); "
                     "nothing to do", out, fp)
            card = pretokenized.read_card(out)
        else:
            job = PretokenizeJob(dataset=cfg.dataset, model_dir=str(model_dir), out=out,
                                 fingerprint=fp, max_length=cfg.max_length,
                                 shard_size=cfg.shard_size, workers=cfg.workers,
                                 trust_remote_code=cfg.trust_remote_code, card_meta=meta,
                                 conversation_format=cfg.conversation_format,
                                 truncate=cfg.truncate)
            part = None if cfg.part is None else (cfg.part, cfg.fan_out)
            outcome = pretokenize(job, force=cfg.force, part=part)
            if outcome.card is None:
                return _part_result(cfg, run, out, fp, outcome, time.monotonic() - start)
            card, reused = outcome.card, outcome.shards_reused
        seconds = time.monotonic() - start
        run.log_metrics(_metrics(card, cached, seconds))
        if not cached:
            run.log_figure(pretokenized.length_histogram_figure(card), "length_histogram.png")
            run.log_text(storage.read_text(storage.join(out, pretokenized.CARD_FILE)),
                         "card.json")
        run_id = run.run_id
    counts = card["counts"]
    log.info("pretokenize: %d rows in, %d written, %d rejected %s -> %s (%.1fs%s)",
             counts["input"], counts["written"], counts["rejected"],
             card["rejected_by_reason"] or "", out, seconds, ", cached" if cached else "")
    return PretokenizeResult(output=out, cached=cached, mlflow_run_id=run_id, fingerprint=fp,
                             rows_in=counts["input"], rows_written=counts["written"],
                             rows_rejected=counts["rejected"], shards=len(card["shards"]),
                             tokens=card["tokens"]["total"], shards_reused=reused,
                             seconds=round(seconds, 3))


def _part_result(cfg: PretokenizeConfig, run: Any, out: str, fp: str, outcome: Any,
                 seconds: float) -> PretokenizeResult:
    """The result (and MLflow metrics) of a fan-out part: its own shards' counts."""
    shards = outcome.shards
    counts = {"rows_in": sum(s["rows_in"] for s in shards),
              "rows_written": sum(s["rows_written"] for s in shards),
              "rows_rejected": sum(len(s["rejects"]) for s in shards),
              "tokens": sum(s["tokens"] for s in shards)}
    run.log_metrics({**counts, "shards": len(shards), "seconds": seconds})
    log.info("pretokenize part %d/%d: %d shards (%d reused), %d rows in -> %s (not committed: "
             "the step's last task commits)", cfg.part, cfg.fan_out, len(shards),
             outcome.shards_reused, counts["rows_in"], out)
    return PretokenizeResult(output=out, cached=False, mlflow_run_id=run.run_id, fingerprint=fp,
                             shards=len(shards), shards_reused=outcome.shards_reused,
                             seconds=round(seconds, 3), part=cfg.part, **counts)


def _default_cache_root() -> str:
    return storage.join(settings.store_root(), "cache", "pretokenized")


def _chat_and_versions(model_dir: Any, trust_remote_code: bool) -> dict[str, str]:
    """What else decides the tokens: the resolved chat template and library versions."""
    import transformers
    from transformers import AutoProcessor

    from mmjobs.models import register_native_models

    register_native_models()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True,
                                              trust_remote_code=trust_remote_code,
                                              **processor_kwargs())
    tokenizer = getattr(processor, "tokenizer", processor)
    return {
        "chat_template": getattr(processor, "chat_template", None) or tokenizer.chat_template,
        "transformers": transformers.__version__,
        # PIL and torchvision image processors resize slightly differently.
        "image_processor": type(getattr(processor, "image_processor", None)).__name__,
    }


def _metrics(card: dict[str, Any], cached: bool, seconds: float) -> dict[str, float]:
    counts, tokens = card["counts"], card["tokens"]
    return {"rows_in": counts["input"], "rows_written": counts["written"],
            "rows_rejected": counts["rejected"], "tokens": tokens["total"],
            "label_tokens": tokens["label"], "image_tokens": tokens["image"],
            "mean_length": tokens["mean_length"], "max_length": tokens["max_length"],
            "shards": len(card["shards"]), "cached": float(cached), "seconds": seconds,
            **{f"rejected_{reason}": n for reason, n in card["rejected_by_reason"].items()}}


def recipe_defaults(recipe: RecipeConfig, step: str) -> dict[str, Any]:
    """The recipe's `data.max_length`, whether the model needs its own code and the
    conversation format (prompts at inference are rendered alike)."""
    return {**({"max_length": recipe.data.max_length} if recipe.data else {}),
            **remote_code_defaults(recipe), **conversation_format_defaults(recipe)}


# Writes to its content-addressed cache ({store}/cache/pretokenized/<fingerprint>), not to
# the step's folder; an interrupted run resumes from its finished shards.
STAGE = Stage(name=NAME, config=PretokenizeConfig, result=PretokenizeResult, main=main,
              image="data", resumable=True, own_output=False,
              inputs=(Input("dataset"), Input("model")), recipe_defaults=recipe_defaults,
              outputs={"shards": "Dataset"},
              usage_errors=(NoChatTemplateError,))  # a setting to choose, not a crash

if __name__ == "__main__":
    sys.exit(STAGE.cli())
