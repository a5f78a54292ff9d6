"""LLM-as-judge evaluation through any OpenAI-compatible `/v1/chat/completions` endpoint.

Align-Anything scores its interleaved Chameleon models with GPT-4o in a separate repository
(htlou/gpt4_eval) and reports win / lose / equal and the win rate not counting ties. This
module does the same inside mmjobs, in the two formats MT-Bench made common:

- single-answer grading: the judge explains, then rates 1-10 as `Rating: [[7]]`;
- pairwise comparison: the judge ends with `[[A]]`, `[[B]]` or `[[C]]` (tie); with
  `swap=True` both orders are judged and an inconsistent pair counts as a tie.
  Align-Anything's `[[responseA]]` / `[[responseB]]` / `[[Equal]]` are accepted too;
- interleaved comparison (`compare_interleaved`): Align-Anything's own judgment of two
  text-and-image answers (htlou/gpt4_eval's interleaved-compare, whose criteria and
  `Better: [[output-1]]` verdicts `mmjobs.eval.interleaved_compare` restates), each image
  shown at its `<image>` marker.

`JudgeClient` handles the transport: the API key comes only from an environment variable
(never from a config file), requests are spaced by a token bucket, 429/5xx/connection errors
are retried with exponential backoff honouring `Retry-After`, and every reply is cached on
disk (or in the store) under sha256(model, messages, sampling settings), so a re-run sends
nothing. The HTTP client is the standard library's: `httpx` is not a dependency of mmjobs.
Whole predictions files are judged by `mmjobs.eval.judging`.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mmjobs import storage
from mmjobs.logs import get_logger

log = get_logger(__name__)

Winner = Literal["A", "B", "tie"]

SINGLE_SYSTEM = (
    "You are an impartial judge of AI assistant answers. Assess how helpful, relevant, "
    "accurate and detailed the answer is for the user's question{ref_clause}. Start with a "
    "short explanation, be as objective as possible, and finish with a rating from 1 to 10 "
    "written exactly as \"Rating: [[N]]\", for example \"Rating: [[6]]\".")
PAIRWISE_SYSTEM = (
    "You are an impartial judge comparing two AI assistants' answers to the same user "
    "question. Decide which answer follows the instructions and answers the question better, "
    "considering helpfulness, relevance, accuracy and detail. The order in which the answers "
    "appear, their length and the assistants' names must not influence you. Start with a "
    "short explanation, then give your verdict exactly as \"[[A]]\" if assistant A is better, "
    "\"[[B]]\" if assistant B is better, or \"[[C]]\" for a tie.")

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_FALLBACK = re.compile(r"Rating:\s*\[?\s*(\d+(?:\.\d+)?)")
_VERDICTS = {"[[A]]": "A", "[[responseA]]": "A", "[[B]]": "B", "[[responseB]]": "B",
             "[[C]]": "tie", "[[Equal]]": "tie"}
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_FATAL_STATUS = frozenset({401, 403, 404})
_IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                (b"GIF8", "image/gif"), (b"RIFF", "image/webp"), (b"BM", "image/bmp"))


class JudgeError(RuntimeError):
    """A judge request failed for good (after retries, or with a non-retryable status)."""


class JudgeConfigError(JudgeError):
    """The endpoint rejects every request (401/403/404): wrong URL, model or API key."""


@dataclass(frozen=True)
class Judgment:
    """One single-answer grade. `score` is None when the reply had no parseable rating."""

    score: float | None
    rationale: str
    raw: str
    error: str | None = None


@dataclass(frozen=True)
class PairwiseJudgment:
    """One pairwise verdict; `winner` is None when a reply could not be parsed or fetched.

    `verdicts` holds the per-order verdicts mapped back to the caller's A/B (one entry, or two
    with the position swap); `consistent` is False when the two orders disagreed.
    """

    winner: Winner | None
    verdicts: tuple[Winner | None, ...]
    consistent: bool
    raws: tuple[str, ...]
    error: str | None = None


def parse_rating(text: str, *, low: float = 1.0, high: float = 10.0) -> float | None:
    """The `[[N]]` rating (or `Rating: N`) in a judge reply, if it lies in [low, high]."""
    for pattern in (_RATING, _RATING_FALLBACK):
        match = pattern.search(text)
        if match:
            value = float(match.group(1))
            return value if low <= value <= high else None
    return None


def parse_verdict(text: str) -> Winner | None:
    """The single verdict token in a judge reply; None if absent or contradictory."""
    found = {winner for token, winner in _VERDICTS.items() if token in text}
    return found.pop() if len(found) == 1 else None


class _TokenBucket:
    """Client-side rate limit: `rate` requests per second, bursts of at most `capacity`."""

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.updated = float(capacity), time.monotonic()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = (1 - self.tokens) / self.rate
            time.sleep(wait)


class JudgeClient:
    """A chat-completions client for judging, with retries, rate limiting and a reply cache.

    Args:
        base_url: the API root including the version, e.g. `https://api.openai.com/v1` or
            `http://vllm:8000/v1`; requests go to `{base_url}/chat/completions`.
        model: the judge model name sent in each request.
        api_key_env: environment variable holding the API key, sent as a Bearer token; unset
            means no Authorization header (local servers). Keys never come from configs.
        timeout_s: per-request timeout.
        max_retries: retries after the first attempt for 429, 5xx and connection errors.
        requests_per_minute: client-side limit (None: unlimited); retries count against it.
        cache_dir: local path or store URI for cached replies (None: no cache).
        temperature, max_tokens: sampling settings (part of the cache key).
        backoff_base_s, backoff_max_s: exponential backoff (with jitter) between retries; a
            `Retry-After` header overrides it, capped at `backoff_max_s`.
        burst: requests allowed back to back before the rate limit spaces them.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 5,
                 requests_per_minute: float | None = None, cache_dir: str | None = None,
                 temperature: float = 0.0, max_tokens: int = 1024,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 burst: int = 1) -> None:
        errors = []
        if not base_url.startswith(("http://", "https://")):
            errors.append(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0:
            errors.append(f"max_retries must be >= 0, got {max_retries}")
        if requests_per_minute is not None and requests_per_minute <= 0:
            errors.append(f"requests_per_minute must be > 0 or None, got {requests_per_minute}")
        if burst < 1:
            errors.append(f"burst must be >= 1, got {burst}")
        if errors:
            raise ValueError("; ".join(errors))
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            log.info("judge: %s is not set; sending requests without an API key", api_key_env)
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.cache_dir = cache_dir
        self.temperature, self.max_tokens = temperature, max_tokens
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self._bucket = (_TokenBucket(requests_per_minute / 60.0, burst)
                        if requests_per_minute else None)
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"JudgeClient(url={self.url!r}, model={self.model!r}, key_env={self.api_key_env})"

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests (HTTP attempts), retries, cache_hits, unparseable, failed."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    # --- judging -------------------------------------------------------------------------------

    def grade(self, question: str, answer: str, reference: str | None = None,
              images: Sequence[str | bytes] | None = None) -> Judgment:
        """Rate one answer 1-10. Unparseable replies give score None (counted, not raised).

        Raises:
            JudgeError: the request failed after retries (or JudgeConfigError: it never can).
        """
        ref_clause = (", using the reference answer as the ground truth" if reference
                      else "")
        text = f"[Question]\n{question}\n\n"
        if reference:
            text += f"[Reference Answer]\n{reference}\n\n"
        text += f"[Assistant's Answer]\n{answer}\n\nRemember to end with \"Rating: [[N]]\"."
        system = SINGLE_SYSTEM.format(ref_clause=ref_clause)
        raw = self.chat([{"role": "system", "content": system},
                         {"role": "user", "content": _content(text, images)}])
        score = parse_rating(raw)
        if score is None:
            self._count("unparseable")
            return Judgment(None, raw.strip(), raw, error="no rating [[1-10]] in the reply")
        return Judgment(score, _rationale(raw), raw)

    def judge_pair(self, question: str, answer_a: str, answer_b: str, *,
                   images: Sequence[str | bytes] | None = None,
                   swap: bool = True) -> PairwiseJudgment:
        """Compare two answers; with `swap`, judge both orders and call disagreement a tie."""
        def ask(first: str, second: str) -> Winner | None:
            text = (f"[User Question]\n{question}\n\n[Assistant A's Answer]\n{first}\n\n"
                    f"[Assistant B's Answer]\n{second}\n\nEnd with [[A]], [[B]] or [[C]].")
            raws.append(self.chat([{"role": "system", "content": PAIRWISE_SYSTEM},
                                   {"role": "user", "content": _content(text, images)}]))
            return parse_verdict(raws[-1])

        raws: list[str] = []
        return self._both_orders(ask, answer_a, answer_b, swap, raws,
                                 "no single [[A]]/[[B]]/[[C]] verdict in a reply")

    def compare_interleaved(self, prompt: str, output_a: str, output_b: str, *,
                            prompt_images: Sequence[str | bytes] = (),
                            images_a: Sequence[str | bytes] = (),
                            images_b: Sequence[str | bytes] = (),
                            swap: bool = False) -> PairwiseJudgment:
        """Align-Anything's interleaved-compare judgment of two text-and-image outputs
        (`mmjobs.eval.interleaved_compare`): A is output-1, B output-2, each image at its
        `<image>` marker. gpt4_eval judges one order (`swap` False); with `swap` both orders
        are judged and a disagreement is a tie.

        Raises:
            ImageCountMismatch: a text's `<image>` markers do not match its images.
            JudgeError: the request failed after retries (or JudgeConfigError: it never can).
        """
        from mmjobs.eval.interleaved_compare import (
            compare_messages,
            parse_better,
            with_image_markers,
        )

        prompt = with_image_markers(prompt, len(prompt_images), where="prompt")
        output_a = with_image_markers(output_a, len(images_a), where="output A")
        output_b = with_image_markers(output_b, len(images_b), where="output B")
        shown = [image_data_uri(i) for i in prompt_images]
        a = (output_a, [image_data_uri(i) for i in images_a])
        b = (output_b, [image_data_uri(i) for i in images_b])

        def ask(first: tuple[str, list[str]], second: tuple[str, list[str]]) -> Winner | None:
            raws.append(self.chat(compare_messages(prompt, first[0], second[0],
                                                   [*shown, *first[1], *second[1]])))
            return parse_better(raws[-1])

        raws: list[str] = []
        return self._both_orders(ask, a, b, swap, raws,
                                 "no Better: [[output-1]]/[[output-2]]/[[equal]] in a reply")

    def _both_orders(self, ask: Any, a: Any, b: Any, swap: bool, raws: list[str],
                     unparseable: str) -> PairwiseJudgment:
        """`ask(first, second)` in the order (a, b), then (b, a) with `swap`; the verdicts
        mapped back to A/B, and disagreement called a tie."""
        verdicts: list[Winner | None] = []
        for first, second, swapped in [(a, b, False)] + ([(b, a, True)] if swap else []):
            verdict = ask(first, second)
            if swapped and verdict in ("A", "B"):
                verdict = "B" if verdict == "A" else "A"
            verdicts.append(verdict)
        if None in verdicts:
            self._count("unparseable")
            return PairwiseJudgment(None, tuple(verdicts), False, tuple(raws), error=unparseable)
        consistent = len(set(verdicts)) == 1
        winner: Winner = verdicts[0] if consistent else "tie"
        return PairwiseJudgment(winner, tuple(verdicts), consistent, tuple(raws))

    def compare(self, question: str, answer_a: str, answer_b: str, *,
                images: Sequence[str | bytes] | None = None, swap: bool = True) -> Winner:
        """The winner: A, B or tie. An unparseable verdict counts as a tie here; `judge_pair`
        tells them apart (and `judge_predictions` counts them)."""
        pair = self.judge_pair(question, answer_a, answer_b, images=images, swap=swap)
        return pair.winner or "tie"

    # --- transport -----------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """The assistant text for `messages`, from the cache or the endpoint."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False)
                             .encode("utf-8")).hexdigest()
        cached = self._cache_get(key)
        if cached is not None:
            self._count("cache_hits")
            return cached
        content = self._post(json.dumps(body).encode("utf-8"))
        self._cache_put(key, content)
        return content

    def _post(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            if self._bucket is not None:
                self._bucket.acquire()
            self._count("requests")
            retry_after: float | None = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers,
                                                 method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return _reply_text(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code in _FATAL_STATUS:
                    raise JudgeConfigError(
                        f"judge endpoint {self.url} answered {e.code} ({detail.strip()}); check "
                        f"base_url, model {self.model!r} and ${self.api_key_env}") from e
                if e.code not in _RETRYABLE_STATUS:
                    raise JudgeError(f"judge request rejected with {e.code}: {detail}") from e
                retry_after = _retry_after(e.headers.get("Retry-After"))
                error: Exception = e
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                    TimeoutError) as e:
                error = e
            if attempt == self.max_retries:
                self._count("failed")
                raise JudgeError(f"judge request failed after {attempt + 1} attempts: "
                                 f"{error}") from error
            delay = retry_after if retry_after is not None else (
                self.backoff_base_s * 2**attempt * random.uniform(0.5, 1.0))
            delay = min(delay, self.backoff_max_s)
            log.debug("judge: %s; retry %d in %.2fs", error, attempt + 1, delay)
            self._count("retries")
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _cache_path(self, key: str) -> str:
        return storage.join(self.cache_dir, key[:2], f"{key}.json")

    def _cache_get(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        try:
            return json.loads(storage.read_text(self._cache_path(key)))["content"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("judge: ignoring a corrupt cache entry %s", self._cache_path(key))
            return None

    def _cache_put(self, key: str, content: str) -> None:
        if self.cache_dir is not None:
            storage.write_text(self._cache_path(key), json.dumps(
                {"model": self.model, "content": content, "created": time.time()}))


def _reply_text(payload: bytes) -> str:
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeError(f"not a chat-completions reply: {payload[:200]!r}") from e
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _rationale(raw: str) -> str:
    """The explanation: the reply without its rating line."""
    return _RATING_FALLBACK.sub("", _RATING.sub("", raw)).strip()


def _content(text: str, images: Sequence[str | bytes] | None) -> str | list[dict[str, Any]]:
    """Plain text, or OpenAI content parts with each image as a base64 data URI."""
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for image in images:
        parts.append({"type": "image_url", "image_url": {"url": image_data_uri(image)}})
    return parts


def image_data_uri(image: str | bytes | os.PathLike) -> str:
    """A `data:` URI for image bytes or a store URI/path; data: and http(s) URLs pass through."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    data = bytes(image) if isinstance(image, bytes | bytearray) else storage.read_bytes(image)
    mime = next((m for magic, m in _IMAGE_MAGIC if data.startswith(magic)),
                "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
