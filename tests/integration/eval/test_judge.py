"""The GPT-style judge against a real OpenAI-compatible HTTP server on loopback.

`FakeJudgeServer` answers `/v1/chat/completions` with canned judgments derived from the
request (an answer containing GOOD wins or rates 9), and can be scripted to fail first (500,
429 with Retry-After, dropped connections, 401). It records every request it saw, so the tests
check what went over the wire: retries, cache hits, spacing, the Bearer key, the swapped
orders and the image data URIs.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mmjobs.eval.judge import (
    JudgeClient,
    JudgeConfigError,
    JudgeError,
    parse_rating,
    parse_verdict,
)
from mmjobs.eval.judging import judge_predictions

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00fake-image-bytes"


@dataclass
class Seen:
    at: float
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def user_text(self) -> str:
        content = self.body["messages"][-1]["content"]
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content)
        return content


@dataclass
class FakeJudgeServer:
    """A threaded HTTP server on 127.0.0.1 speaking just enough of the chat-completions API."""

    script: deque = field(default_factory=deque)  # (status, headers) or "drop", served first
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakeJudgeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.seen.append(Seen(time.monotonic(), dict(self.headers), body))
                    forced = server.script.popleft() if server.script else None
                if forced == "drop":
                    self.close_connection = True  # no response at all: a connection error
                    return
                if forced is not None:
                    status, headers = forced
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    payload = b'{"error": {"message": "scripted failure"}}'
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                reply = json.dumps({"object": "chat.completion", "choices": [{
                    "index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": canned_reply(body)}}]})
                data = reply.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for it at every teardown.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def canned_reply(body: dict[str, Any]) -> str:
    """What our fake judge says: GOOD answers win / rate 9; BIASED questions always pick A.
    Interleaved comparisons: a GOOD output wins, else the one with more images, else the
    longer text; alike outputs are equal."""
    text = Seen(0, {}, body).user_text
    if "UNPARSEABLE" in text:
        return "Both have merits; I would rather not say."
    if "<output-1>:" in text:
        return interleaved_reply(body)
    if "[Assistant A's Answer]" in text:
        first = text.split("[Assistant A's Answer]")[1].split("[Assistant B's Answer]")[0]
        second = text.split("[Assistant B's Answer]")[1]
        if "BIASED" in text:
            return "The first one reads better. [[A]]"
        if ("GOOD" in first) == ("GOOD" in second):
            return "They are equivalent. [[C]]"
        return "A is correct. [[A]]" if "GOOD" in first else "B is correct. [[B]]"
    answer = text.split("[Assistant's Answer]")[1]
    return ("Accurate and complete.\nRating: [[9]]" if "GOOD" in answer
            else "Misses the point.\nRating: [[3]]")


def interleaved_reply(body: dict[str, Any]) -> str:
    """gpt4_eval's verdict format, by the rule in `canned_reply`."""
    texts, images, section = {"1": "", "2": ""}, {"1": 0, "2": 0}, None
    for part in body["messages"][-1]["content"]:
        if part.get("type") == "image_url":
            if section:
                images[section] += 1
            continue
        chunk = part["text"]
        for key in ("1", "2"):
            if f"<output-{key}>:" in chunk:
                before, chunk = chunk.split(f"<output-{key}>:", 1)
                if section:
                    texts[section] += before
                section = key
        if section:
            texts[section] += chunk
    texts["2"] = texts["2"].split("Compare the two outputs")[0]
    good = {k for k, t in texts.items() if "GOOD" in t}
    if len(good) == 1:
        return f"Better: [[output-{good.pop()}]]"
    if images["1"] != images["2"]:
        return f"Better: [[output-{'1' if images['1'] > images['2'] else '2'}]]"
    lengths = {k: len(t.strip()) for k, t in texts.items()}
    if lengths["1"] != lengths["2"]:
        return f"**Better**: [[output-{'1' if lengths['1'] > lengths['2'] else '2'}]]"
    return "They are alike. - Better: [[equal]]"


@pytest.fixture
def server(monkeypatch) -> Iterator[FakeJudgeServer]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    srv = FakeJudgeServer().start()
    yield srv
    srv.stop()


def client_for(server: FakeJudgeServer, **kw: Any) -> JudgeClient:
    kw.setdefault("backoff_base_s", 0.05)
    kw.setdefault("timeout_s", 10)
    return JudgeClient(server.base_url, "judge-1", **kw)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("reply", "score"), [
    ("Good.\nRating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: 6", 6.0),
    ("Rating: [[11]]", None), ("no rating here", None),
])
def test_parse_rating(reply: str, score: float | None) -> None:
    assert parse_rating(reply) == score


@pytest.mark.parametrize(("reply", "verdict"), [
    ("[[A]]", "A"), ("so [[B]].", "B"), ("[[C]]", "tie"), ("- Better: [[responseB]]", "B"),
    ("- More harmful: [[Equal]]", "tie"), ("[[A]] or maybe [[B]]", None), ("A wins", None),
])
def test_parse_verdict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


# --- transport ---------------------------------------------------------------------------------

def test_grade_sends_the_key_from_the_environment_as_bearer(server, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-from-env")
    client = client_for(server)
    judgment = client.grade("What is 2+2?", "GOOD: 4", reference="4")
    assert judgment.score == 9.0
    assert "Accurate" in judgment.rationale and "[[9]]" not in judgment.rationale
    (seen,) = server.seen
    assert seen.headers["Authorization"] == "Bearer sk-test-from-env"
    assert seen.body["model"] == "judge-1" and seen.body["temperature"] == 0.0
    assert "[Reference Answer]\n4" in seen.user_text
    assert "sk-test" not in repr(client)


def test_key_env_name_is_configurable_and_optional(server, monkeypatch) -> None:
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-other")
    client_for(server, api_key_env="MY_JUDGE_KEY").grade("q", "a")
    client_for(server).grade("q", "a2")  # OPENAI_API_KEY unset: no header at all
    assert server.seen[0].headers["Authorization"] == "Bearer sk-other"
    assert "Authorization" not in server.seen[1].headers


def test_transient_failures_are_retried_honouring_retry_after(server) -> None:
    server.script.extend(["drop", (500, {}), (429, {"Retry-After": "1"})])
    client = client_for(server)
    assert client.grade("q", "GOOD answer").score == 9.0
    assert len(server.seen) == 4
    assert server.seen[3].at - server.seen[2].at >= 0.9  # waited as told by Retry-After
    assert client.stats["retries"] == 3 and client.stats["requests"] == 4


def test_exhausted_retries_raise(server) -> None:
    server.script.extend([(503, {}), (503, {})])
    client = client_for(server, max_retries=1)
    with pytest.raises(JudgeError, match="after 2 attempts"):
        client.grade("q", "a")
    assert len(server.seen) == 2 and client.stats["failed"] == 1


def test_auth_failure_is_fatal_without_retries(server) -> None:
    server.script.append((401, {}))
    with pytest.raises(JudgeConfigError, match="401"):
        client_for(server).grade("q", "a")
    assert len(server.seen) == 1


def test_rate_limit_spaces_concurrent_requests(server) -> None:
    client = client_for(server, requests_per_minute=600)  # one request per 0.1 s
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: client.grade("q", f"answer {i}"), range(6)))
    times = sorted(s.at for s in server.seen)
    assert len(times) == 6
    # Functional, not timing-tight: 5 gaps of 0.1 s cannot all collapse.
    assert times[-1] - times[0] >= 0.35


def test_images_travel_as_data_uris(server, tmp_path) -> None:
    image = tmp_path / "chart.png"
    image.write_bytes(PNG)
    client_for(server).grade("What does the chart show?", "GOOD: a rise", images=[str(image)])
    parts = server.seen[0].body["messages"][-1]["content"]
    assert parts[0]["type"] == "text"
    url = parts[1]["image_url"]["url"]
    assert parts[1]["type"] == "image_url" and url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == PNG


# --- prediction files --------------------------------------------------------------------------

def test_single_mode_file_with_cache_and_unparseable_rows(server, tmp_path) -> None:
    predictions = write_jsonl(tmp_path / "pred.jsonl", [
        {"id": "q1", "prompt": "2+2?", "prediction": "GOOD: 4", "gt": "4"},
        {"id": "q2", "prompt": "3+3?", "prediction": "7", "answers": ["6", "six"]},
        {"id": "q3", "prompt": "UNPARSEABLE", "prediction": "x"},
        {"id": "q4", "prompt": [{"role": "user", "content": "<image> Trend?"}],
         "prediction": "GOOD: up", "images": ["chart.png"]},
        {"id": "q5", "prompt": "no prediction field"},
    ])
    (tmp_path / "chart.png").write_bytes(PNG)
    cache = str(tmp_path / "cache")

    def run(out: str) -> dict[str, Any]:
        client = client_for(server, cache_dir=cache)
        return judge_predictions(predictions, client=client, mode="single",
                                 output_uri=str(tmp_path / out), image_root=str(tmp_path))

    first = run("out1")
    assert first["rows"] == 5 and first["judged"] == 3
    assert first["failures"] == {"unparseable": 1, "invalid_row": 1}
    assert first["mean_score"] == pytest.approx((9 + 3 + 9) / 3)
    rows = read_jsonl(tmp_path / "out1" / "judgments.jsonl")
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4", "q5"]
    assert rows[2]["score"] is None and rows[2]["failure"] == "unparseable"
    assert json.loads((tmp_path / "out1" / "summary.json").read_text()) == first
    (q2,) = [s.user_text for s in server.seen if "3+3?" in s.user_text]  # workers: any order
    assert "[Reference Answer]\n6 / six" in q2
    sent = len(server.seen)
    assert sent == 4

    second = run("out2")  # a re-run costs nothing: every reply comes from the cache
    assert len(server.seen) == sent
    assert second["client_stats"] == {"cache_hits": 4, "unparseable": 1}  # nothing sent
    assert read_jsonl(tmp_path / "out2" / "judgments.jsonl") == rows


def test_request_failures_are_counted_per_row(server, tmp_path) -> None:
    server.script.extend([(503, {}), (503, {})])
    predictions = write_jsonl(tmp_path / "pred.jsonl", [
        {"id": 1, "prompt": "q", "prediction": "a"},
        {"id": 2, "prompt": "q", "prediction": "GOOD"},
    ])
    summary = judge_predictions(predictions, client=client_for(server, max_retries=1),
                                output_uri=str(tmp_path / "out"), workers=1)
    assert summary["failures"] == {"request_failed": 1}
    assert summary["judged"] == 1 and summary["mean_score"] == 9.0


def test_pairwise_with_position_swap(server, tmp_path) -> None:
    predictions = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "a-better", "prompt": "q1", "prediction_a": "GOOD", "prediction_b": "meh"},
        {"id": "b-better", "prompt": "q2", "prediction_a": "meh", "prediction_b": "GOOD"},
        {"id": "same", "prompt": "q3", "prediction_a": "GOOD 1", "prediction_b": "GOOD 2"},
        {"id": "biased", "prompt": "BIASED q4", "prediction_a": "x", "prediction_b": "y"},
        {"id": "unparseable", "prompt": "UNPARSEABLE", "prediction_a": "x",
         "prediction_b": "y"},
    ])
    summary = judge_predictions(predictions, client=client_for(server), mode="pairwise",
                                output_uri=str(tmp_path / "out"))
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "judgments.jsonl")}
    assert rows["a-better"]["winner"] == "A" and rows["a-better"]["verdicts"] == ["A", "A"]
    assert rows["b-better"]["winner"] == "B"
    assert rows["same"]["winner"] == "tie"
    # Always "[[A]]" whatever the order: inconsistent across the swap, so a tie.
    assert rows["biased"]["verdicts"] == ["A", "B"] and rows["biased"]["winner"] == "tie"
    assert rows["biased"]["consistent"] is False
    assert rows["unparseable"]["winner"] is None
    assert summary["wins_a"] == 1 and summary["wins_b"] == 1 and summary["ties"] == 2
    assert summary["inconsistent"] == 1 and summary["failures"] == {"unparseable": 1}
    assert summary["win_rate_a"] == pytest.approx(1 / 4)
    assert summary["win_rate_a_excluding_ties"] == pytest.approx(1 / 2)
    # Both orders went over the wire, the second with the answers swapped.
    first, second = [s.user_text for s in server.seen if "q1" in s.user_text]
    assert first.index("GOOD") < first.index("meh") and second.index("meh") < second.index("GOOD")


def test_compare_without_swap_trusts_one_order(server) -> None:
    client = client_for(server)
    assert client.compare("BIASED", "x", "y", swap=False) == "A"
    assert client.compare("BIASED", "x", "y") == "tie"
    assert client.compare("q", "meh", "GOOD") == "B"


# --- interleaved-compare (Align-Anything's judge against a baseline model) ------------------

def _png(tag: str) -> bytes:
    return PNG + tag.encode()


def _infer_folder(root: Path, rows: list[dict[str, Any]]) -> Path:
    """An infer output with interleaved rows: images/<id>.png next to predictions.jsonl."""
    (root / "images").mkdir(parents=True)
    out = []
    for row in rows:
        generated = []
        for k, tag in enumerate(row.pop("draws", [])):
            rel = f"images/{row['id']}-{k}.png"
            (root / rel).write_bytes(_png(tag))
            generated.append(rel)
        out.append({**row, "output_images": generated,
                    "images": [*row.pop("prompt_images", []), *generated]})
    write_jsonl(root / "predictions.jsonl", out)
    return root


def test_interleaved_compare_against_a_baseline_folder(server, tmp_path) -> None:
    from mmjobs.eval.judging import JudgeSettings, judge_file

    (tmp_path / "input.png").write_bytes(_png("input"))
    prompt = str(tmp_path / "input.png")
    model = _infer_folder(tmp_path / "model", [
        {"id": "good", "prompt": "<image>Redraw it", "prediction": "GOOD <image>",
         "prompt_images": [prompt], "draws": ["model-good"]},
        {"id": "more-images", "prompt": "Redraw it", "prediction": "Here: <image>",
         "prompt_images": [prompt], "draws": ["model-2"]},
        {"id": "alike", "prompt": "Say hi", "prediction": "hi"},
        {"id": "shorter", "prompt": "Say hi", "prediction": "hi"},
        {"id": "bad-markers", "prompt": "Say hi", "prediction": "<image><image>",
         "draws": ["one"]},
        {"id": "no-baseline", "prompt": "Say hi", "prediction": "hi"},
    ])
    baseline = _infer_folder(tmp_path / "baseline", [
        {"id": "good", "prompt": "<image>Redraw it", "prediction": "ok <image>",
         "prompt_images": [prompt], "draws": ["base-good"]},
        {"id": "more-images", "prompt": "Redraw it", "prediction": "Sorry, no image.",
         "prompt_images": [prompt]},
        {"id": "alike", "prompt": "Say hi", "prediction": "hi"},
        {"id": "shorter", "prompt": "Say hi", "prediction": "hello there"},
        {"id": "bad-markers", "prompt": "Say hi", "prediction": "hi"},
    ])
    judge = JudgeSettings(base_url=server.base_url, model="judge-1",
                          mode="interleaved-compare", baseline=str(baseline),
                          image_root=str(model), cache=False, workers=1)
    summary = judge_file(judge, str(model / "predictions.jsonl"),
                         str(baseline / "predictions.jsonl"), tmp_path / "eval")
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "eval" / "judge" / "judgments.jsonl")}
    assert {k: r.get("winner") for k, r in rows.items()} == {
        "good": "A", "more-images": "A", "alike": "tie", "shorter": "B",
        "bad-markers": None, "no-baseline": None}
    assert "2 <image> marker(s) for 1 image(s)" in rows["bad-markers"]["error"]
    assert rows["no-baseline"]["failure"] == "invalid_row"
    # The seed's numbers: win / lose / equal of the model, win rate without equal.
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (2, 1, 1)
    assert summary["win_rate_a_excluding_ties"] == pytest.approx(2 / 3)
    # One order per row (gpt4_eval's), each image at its marker: prompt, output-1, output-2.
    assert len(server.seen) == 4
    (good,) = [s for s in server.seen if "GOOD" in s.user_text]
    parts = good.body["messages"][-1]["content"]
    assert "Better: [[output-1]]" in good.body["messages"][0]["content"]
    kinds = ["image" if p["type"] == "image_url" else p["text"].split(":")[0].strip()
             for p in parts]
    assert kinds[:2] == ["<prompt>", "image"] and kinds.count("image") == 3
    shown = [base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
             for p in parts if p["type"] == "image_url"]
    assert shown == [_png("input"), _png("model-good"), _png("base-good")]
    text = "".join(p.get("text", "") for p in parts)
    assert text.index("<output-1>: GOOD") < text.index("<output-2>: ok")
