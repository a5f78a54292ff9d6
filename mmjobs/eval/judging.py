"""Judge a whole predictions file with an LLM (`mmjobs.eval.judge.JudgeClient`).

`JudgeSettings` is the evaluate stage's `judge:` section; `judge_file` hands the rows over as
a local JSONL (for pairwise judging, each row's prediction as A and the same id's prediction in
the `baseline` file as B) to `judge_predictions`, which grades every row with a bounded thread
pool and writes `judgments.jsonl` (input order) and `summary.json`. The API key is read from
the environment variable `key_env`, never from a config.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field

from mmjobs import settings, storage
from mmjobs.config import StrictModel
from mmjobs.data.json_rows import iter_jsonl
from mmjobs.eval.interleaved_compare import ImageCountMismatch
from mmjobs.eval.judge import JudgeClient, JudgeConfigError, JudgeError
from mmjobs.logs import get_logger

log = get_logger(__name__)

JudgeMode = Literal["single", "pairwise", "interleaved-compare"]
JUDGE_MODES: tuple[str, ...] = ("single", "pairwise", "interleaved-compare")


class JudgeSettings(StrictModel):
    """An OpenAI-compatible LLM judge (`mmjobs.eval.judge`)."""

    base_url: str = Field(description="API root with version, e.g. http://vllm:8000/v1.")
    model: str = Field(description="Judge model name.")
    mode: JudgeMode = Field(
        "single", description="single: 1-10 grade per answer; pairwise: A vs B verdicts "
        "(MT-Bench prompt); interleaved-compare: Align-Anything's comparison of two "
        "text-and-image answers (htlou/gpt4_eval), each answer's generated images shown at "
        "its <image> markers; both pairwise modes need `baseline` or prediction_a/_b rows.")
    key_env: str = Field(
        "OPENAI_API_KEY", validation_alias=AliasChoices("key_env", "api_key_env"),
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (unset: no key). "
        "The key itself never goes in a config.")
    baseline: str | None = Field(
        None, description="pairwise: predictions JSONL (or infer folder) of the model to "
        "compare against (B); rows are matched by id. Without it, rows need prediction_a/_b.")
    workers: int = Field(4, ge=1, description="Concurrent judge requests.")
    swap: bool | None = Field(None, description="pairwise modes: judge both orders "
                              "(position-bias check; a disagreement is a tie). None: on for "
                              "pairwise, off for interleaved-compare (gpt4_eval judges the "
                              "evaluated model as output-1 only).")
    requests_per_minute: float | None = Field(None, gt=0, description="Client rate limit.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(5, ge=0, description="Retries for 429/5xx/connection errors.")
    image_root: str | None = Field(None, description="Where relative row images live.")
    cache: bool = Field(True, description="Cache replies under {store}/cache/judge (re-runs "
                        "send nothing).")


def judge_file(judge: JudgeSettings, source: str, baseline: str | None,
               out_dir: Path) -> dict[str, Any]:
    """Judge the predictions file `source` as `judge` says (pairwise: against the same ids of
    `baseline`), writing `out_dir/judge/`; returns the judge's summary."""
    cache = storage.join(settings.store_root(), "cache", "judge") if judge.cache else None
    client = JudgeClient(judge.base_url, judge.model, api_key_env=judge.key_env,
                         timeout_s=judge.timeout_s, max_retries=judge.max_retries,
                         requests_per_minute=judge.requests_per_minute, cache_dir=cache)
    with tempfile.TemporaryDirectory(prefix="mmjobs-judge-",
                                     dir=os.environ.get("MMJOBS_TMP")) as tmp:
        # The judge reads its rows line by line from a local file (an S3 body iterates in
        # fixed-size chunks, not lines), so rows are always handed over as a local JSONL.
        rows = Path(tmp) / "rows.jsonl"
        if judge.mode != "single" and baseline is not None:
            _write_pairs(source, baseline, rows)
        else:
            storage.get_file(source, rows)
        swap = judge.swap if judge.swap is not None else judge.mode == "pairwise"
        return judge_predictions(str(rows), client=client, mode=judge.mode,
                                 output_uri=str(out_dir / "judge"), workers=judge.workers,
                                 swap=swap, image_root=judge.image_root)


def _write_pairs(source: str, baseline: str, path: Path) -> None:
    """Rows of `source` as A and the same ids of `baseline` as B, for pairwise judging.

    Interleaved rows (`output_images`, `mmjobs.eval.interleaved`) also get `images_a` (A's
    generated images, relative like A's other images) and `images_b` (B's, made absolute:
    they are relative to the baseline's own folder), and `images` keeps the prompt's only.
    """
    b_root = baseline.rsplit("/", 1)[0]  # the baseline infer output's folder
    b_rows = {row.get("id"): row for row in _rows(baseline)}
    with open(path, "w", encoding="utf-8") as f:
        for row in _rows(source):
            pair = {k: v for k, v in row.items() if k != "prediction"}
            pair["prediction_a"] = row.get("prediction")
            if "output_images" in row:
                pair["images"], pair["images_a"] = _split_images(row)
            other = b_rows.get(row.get("id"))
            if other is not None:  # else the judge reports the row as invalid
                pair["prediction_b"] = other.get("prediction")
                pair.setdefault("prompt", other.get("prompt"))
                if "output_images" in other:
                    pair["images_b"] = [image if "://" in image or os.path.isabs(image)
                                        else storage.join(b_root, image)
                                        for image in _split_images(other)[1]]
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")


def _split_images(row: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(the prompt's images, the generated ones) of an interleaved predictions row, whose
    `images` are the prompt's followed by `output_images`."""
    generated = list(row.get("output_images") or [])
    images = list(row.get("images") or [])
    if generated and images[len(images) - len(generated):] == generated:
        images = images[:len(images) - len(generated)]
    return images, generated


def judge_predictions(predictions_uri: str, *, client: JudgeClient,
                      mode: JudgeMode = "single", output_uri: str,
                      workers: int = 4, swap: bool = True,
                      image_root: str | None = None) -> dict[str, Any]:
    """Judge every row of a predictions JSONL; write per-row judgments and a summary.

    Rows: `id`, `prompt` (text or a conversation), and `prediction` (single; plus optional
    `reference`, `gt` or `answers`) or `prediction_a` and `prediction_b` (pairwise modes);
    optional `images` (store URIs, or paths relative to `image_root`): with
    interleaved-compare the prompt's, with `images_a` / `images_b` the images of each answer
    in the order of its `<image>` markers.

    Writes `{output_uri}/judgments.jsonl` (input order) and `{output_uri}/summary.json`.
    Returns the summary: counts of judged rows and failures by kind, the mean score (single)
    or wins / losses / ties and win rates of A (pairwise modes: the seed's win / lose /
    equal, and its win rate not counting equal), and `client_stats` (requests,
    retries, cache hits, unparseable replies).

    Raises:
        JudgeConfigError: the endpoint rejects requests outright (URL, model or key).
        ValueError: `mode` or `workers` is invalid.
    """
    if mode not in JUDGE_MODES:
        raise ValueError(f"mode must be one of {', '.join(JUDGE_MODES)}, got {mode!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def judge_row(row: dict[str, Any]) -> dict[str, Any]:
        return _judge_row(row, client, mode, swap, image_root)

    records: list[dict[str, Any]] = []
    with storage.open_write(storage.join(output_uri, "judgments.jsonl")) as out, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
        for batch in _batches(_rows(predictions_uri), workers * 8):
            for record in pool.map(judge_row, batch):
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                records.append(_summary_fields(record))
    summary = _summarize(records, mode, client)
    storage.write_text(storage.join(output_uri, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _rows(uri: str) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL, streamed; a line that is not JSON fails, naming file and line."""
    for row in iter_jsonl(uri):
        if row.error and row.data is None:
            raise ValueError(f"{uri}:{row.line}: not valid JSON ({row.error})")
        yield row.data


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    # Bounded batches: the thread pool never holds the whole file.
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # a canonical conversation
        return "\n".join(f"{turn.get('role', 'user')}: {turn.get('content', '')}"
                         for turn in prompt if isinstance(turn, dict))
    return str(prompt)


def _reference(row: dict[str, Any]) -> str | None:
    value = row.get("reference", row.get("gt", row.get("answers")))
    if isinstance(value, list):
        return " / ".join(str(v) for v in value) or None
    return None if value is None else str(value)


def _judge_row(row: dict[str, Any], client: JudgeClient, mode: str, swap: bool,
               image_root: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {"id": row.get("id"), "mode": mode}
    needed = ("prompt", "prediction") if mode == "single" else (
        "prompt", "prediction_a", "prediction_b")
    missing = [name for name in needed if name not in row]
    if missing:
        return {**record, "error": f"missing field(s): {', '.join(missing)}",
                "failure": "invalid_row"}
    def located(key: str) -> list[str]:
        return [image if image_root is None or "://" in image or os.path.isabs(image)
                else storage.join(image_root, image) for image in row.get(key) or []]

    images = located("images")
    question = _prompt_text(row["prompt"])
    try:
        if mode == "single":
            judgment = client.grade(question, str(row["prediction"]), _reference(row), images)
            record.update(asdict(judgment))
            if judgment.score is None:
                record["failure"] = "unparseable"
        else:
            if mode == "interleaved-compare":
                pair = client.compare_interleaved(
                    question, str(row["prediction_a"]), str(row["prediction_b"]),
                    prompt_images=images, images_a=located("images_a"),
                    images_b=row.get("images_b") or [], swap=swap)
            else:
                pair = client.judge_pair(question, str(row["prediction_a"]),
                                         str(row["prediction_b"]), images=images, swap=swap)
            record.update(asdict(pair))
            if pair.winner is None:
                record["failure"] = "unparseable"
    except JudgeConfigError:
        raise
    except JudgeError as e:
        record.update(error=str(e), failure="request_failed")
    except (storage.StoreError, OSError, ImageCountMismatch) as e:  # unreadable images
        record.update(error=str(e), failure="invalid_row")
    return record


def _summary_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("score", "winner", "consistent", "failure")}


def _summarize(records: list[dict[str, Any]], mode: str, client: JudgeClient) -> dict[str, Any]:
    failures = Counter(r["failure"] for r in records if r.get("failure"))
    summary: dict[str, Any] = {"mode": mode, "model": client.model, "rows": len(records),
                               "judged": len(records) - sum(failures.values()),
                               "failures": dict(failures), "client_stats": client.stats}
    if mode == "single":
        scores = [r["score"] for r in records if r.get("score") is not None]
        summary["mean_score"] = sum(scores) / len(scores) if scores else None
        return summary
    winners = Counter(r["winner"] for r in records if r.get("winner"))
    wins, losses, ties = winners["A"], winners["B"], winners["tie"]
    decided = wins + losses + ties
    summary.update(
        wins_a=wins, wins_b=losses, ties=ties,
        inconsistent=sum(1 for r in records if r.get("winner") and r.get("consistent") is False),
        win_rate_a=wins / decided if decided else None,
        # Align-Anything's headline number: win rate not counting ties.
        win_rate_a_excluding_ties=wins / (wins + losses) if wins + losses else None)
    return summary
