"""The interleaved-compare judge prompt and the seed's win / lose / equal table (no server)."""

from __future__ import annotations

import pytest

from mmjobs.eval.interleaved_compare import (
    ImageCountMismatch,
    compare_messages,
    parse_better,
    with_image_markers,
)
from mmjobs.eval.report import win_lose_table


@pytest.mark.parametrize(("reply", "verdict"), [
    ("reasoning...\n- Better: [[output-1]]", "A"),
    ("**Better**: [[output-2]]", "B"),  # gpt4_eval's pattern allows the bold form
    ("Better: [[Output2]]", "B"),
    ("Better: [[equal]]", "tie"),
    ("Better: [[output-3]]", None),
    ("I prefer the first.", None),
])
def test_parse_better_reads_gpt4_evals_verdicts(reply: str, verdict: str | None) -> None:
    assert parse_better(reply) == verdict


def test_images_go_where_their_markers_are() -> None:
    messages = compare_messages("<image>Redraw", "Done: <image> ok", "No.",
                                ["data:p", "data:a"])
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert [p["image_url"]["url"] for p in parts if p["type"] == "image_url"] == [
        "data:p", "data:a"]
    assert parts[0]["text"].endswith("<prompt>: ") and parts[2]["text"].endswith("Done: ")
    with pytest.raises(ImageCountMismatch, match="2 <image> marker"):
        compare_messages("<image>", "<image>", "", ["data:p"])


def test_prompt_images_without_markers_go_first_and_mismatches_are_named() -> None:
    assert with_image_markers("Redraw", 2, where="prompt") == "<image><image>Redraw"
    assert with_image_markers("a <image>", 1, where="output A") == "a <image>"
    with pytest.raises(ImageCountMismatch, match="output B: 1 <image> marker"):
        with_image_markers("<image>", 2, where="output B")


def test_the_seeds_table_layout() -> None:
    # The Chameleon Plus README: AA-Chameleon-7B+ vs Anole-7b on 500 prompts.
    seed = {"AA-Chameleon-7B+": {"judge": {"mode": "interleaved-compare", "wins_a": 240,
                                           "wins_b": 175, "ties": 85,
                                           "win_rate_a_excluding_ties": 240 / 415}},
            "graded": {"judge": {"mode": "single", "mean_score": 7.0}}}
    lines = win_lose_table(seed, baseline="Anole-7b").splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["model", "vs", "win", "lose", "equal", "win rate (not counting equal)"]
    assert cells[2] == ["AA-Chameleon-7B+", "Anole-7b", "240", "175", "85", "57.8%"]
    assert len(lines) == 3  # the single-grade summary has no row
    csv = win_lose_table(seed, fmt="csv").splitlines()
    assert csv[0] == "model,win,lose,equal,win rate (not counting equal)"
    assert csv[1].startswith("AA-Chameleon-7B+,240,175,85,0.578")
