"""`mmjobs run`'s console: one line per step start and finish, the running step's latest line
(redrawn on a terminal, periodic elsewhere), no colour codes outside a terminal, every line in
the full log; recipe names with did-you-mean; `mmjobs validate` reports everything at once."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmjobs import pipeline_logs, pipeline_runner
from mmjobs.config import ConfigError
from mmjobs.recipe import bundled_recipes, resolve_recipe

BUILD = SimpleNamespace(steps=[SimpleNamespace(task="train-2", name="sft", stage="train"),
                               SimpleNamespace(task="prepare", name="prepare", stage="prepare")])


def kfp(message: str) -> str:
    """A line of KFP's local runner (its logger: time, level, colour codes)."""
    return f"12:00:00.123 - INFO - {message}\n"


def task(name: str) -> str:
    return f"\x1b[96m'{name}'\x1b[0m"


def run_lines(logs: pipeline_logs.StepLogs, *, status: str = "SUCCESS",
              lines: tuple[str, ...] = ()) -> None:
    """What KFP prints for one task, from one thread (as the local runner does)."""
    logs.write(kfp(f"Executing task {task('train-2')}"))
    logs.write(kfp("Streamed logs:\n"))
    for line in lines:
        logs.write(f"    {line}\n")
    logs.write(kfp(f"Task {task('train-2')} finished with status \x1b[92m{status}\x1b[0m"))


def calm(**kwargs) -> tuple[pipeline_logs.StepLogs, io.StringIO, io.StringIO]:
    out, full = io.StringIO(), io.StringIO()
    steps = {s.task: s.name for s in BUILD.steps}
    stages = {s.task: s.stage for s in BUILD.steps}
    return pipeline_logs.StepLogs(out, False, steps, stages, full_log=full, **kwargs), out, full


TRAIN_LINES = ("12:00:01 INFO mmjobs.train.metrics: step 1/2 loss 2.3100",
               "Map: 100%|\x1b[32m██████████\x1b[0m| 12/12 [00:00<00:00]",
               "/x/transformers/utils.py:12: FutureWarning: `foo` is deprecated",
               "12:00:02 INFO mmjobs.train.metrics: step 2/2 loss 1.9800")


def test_a_step_prints_one_line_when_it_starts_and_one_when_it_ends():
    logs, out, _ = calm(live=False)
    run_lines(logs, lines=TRAIN_LINES)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("[1/2] sft (train) started")
    assert "[1/2] sft (train) done in " in lines[1]
    assert "\x1b" not in out.getvalue()


def test_a_reused_step_and_a_failed_step_say_so():
    logs, out, _ = calm(live=False)
    run_lines(logs, lines=("12:00:01 INFO mmjobs.stage_contract: sft: output already committed "
                           "for these inputs (fingerprint ab12); reusing it",))
    assert "sft (train) reused its committed output in" in out.getvalue()
    logs, out, _ = calm(live=False)
    run_lines(logs, status="FAILURE")
    assert "sft (train) FAILED (failure) in" in out.getvalue()


def test_the_full_log_has_every_line_of_the_step_without_colour_codes():
    logs, _, full = calm(live=False)
    run_lines(logs, lines=TRAIN_LINES)
    text = full.getvalue()
    assert "\x1b" not in text
    for line in ("step 1/2 loss 2.3100", "Map: 100%", "FutureWarning", "step 2/2 loss 1.9800"):
        assert any(row.startswith("[sft] ") and line in row for row in text.splitlines()), line


def test_without_a_terminal_the_running_step_reports_its_latest_line_periodically():
    logs, out, _ = calm(live=False, every_seconds=0)
    run_lines(logs, lines=TRAIN_LINES)
    progress = [line for line in out.getvalue().splitlines() if "sft:" in line]
    # The log prefix is dropped; warnings are not progress.
    assert [p.split("sft: ", 1)[1] for p in progress] == [
        "step 1/2 loss 2.3100", "Map: 100%|██████████| 12/12 [00:00<00:00]",
        "step 2/2 loss 1.9800"]


def test_on_a_terminal_a_status_line_shows_the_running_step_and_is_cleared():
    logs, out, _ = calm(live=True)
    logs.write(kfp(f"Executing task {task('train-2')}"))
    logs.write("    12:00:01 INFO mmjobs.train.metrics: step 1/2 loss 2.3100\n")
    shown = out.getvalue()
    assert "\r\x1b[K  ... sft 0s: step 1/2 loss 2.3100" in shown
    assert shown.count("\r\x1b[K  ... sft 0s\r") == 1  # an unchanged status is not redrawn
    logs.write(kfp(f"Task {task('train-2')} finished with status SUCCESS"))
    logs.close_status()
    # The status line is cleared before the step's last line; nothing runs, nothing is left.
    after_last_clear = out.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert after_last_clear.endswith("[1/2] sft (train) done in 0s\n")


def test_verbose_prints_every_line_and_names_the_step():
    out = io.StringIO()
    logs = pipeline_logs.StepLogs(out, True, {"train-2": "sft"}, live=False)
    run_lines(logs, lines=TRAIN_LINES)
    text = out.getvalue()
    assert "Executing task 'train-2' (step sft)" in text
    assert "step 2/2 loss 1.9800" in text and "FutureWarning" in text
    assert "\x1b" not in text


def test_a_failure_names_the_step_its_last_lines_and_the_full_log():
    logs, _, _ = calm(live=False)
    run_lines(logs, status="FAILURE",
              lines=("mmjobs prepare: 3 of 3 rows rejected (100.0%) > 1.0%",))
    error = pipeline_logs.step_error(
        RuntimeError("Pipeline 'x' finished with status FAILURE. Inner task failed: "
                     f"{task('train-2')}."), BUILD, logs, "/store/x/run-1/logs/1.log")
    message = str(error)
    assert message.startswith("step 'sft' (stage train) failed. Last lines of its log:")
    assert "3 of 3 rows rejected" in message
    assert "The full log: /store/x/run-1/logs/1.log" in message


# --------------------------------------------------------------------------- recipe names


def test_a_bundled_recipe_is_found_by_its_name():
    assert resolve_recipe("chart-demo") == bundled_recipes()["chart-demo"]
    assert resolve_recipe("chart-demo.yaml").name == "chart-demo.yaml"
    assert set(bundled_recipes()) >= {"chart-demo", "chartmoe", "lavin-sweep"}


@pytest.mark.parametrize(("given", "suggested"), [
    ("chart-dmo", "did you mean chart-demo"),
    ("pipelines/recipes/chartmo.yaml", "did you mean pipelines/recipes/chartmoe.yaml"),
    ("no-such-thing-at-all", "bundled recipes: "),
])
def test_a_mistyped_recipe_gets_suggestions(given, suggested):
    with pytest.raises(ConfigError) as e:
        resolve_recipe(given)
    assert suggested in str(e.value)
    assert str(e.value).startswith(f"{given}: 1 error")


def test_validate_reports_recipe_and_step_errors_in_one_pass(tmp_path: Path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("recipe: chart-demo\nmodel: {name_or_path: 'tiny:llava'}\n"
                      "train: {lr: fast}\nstages:\n  sft: {train: {max_steps: many}}\n"
                      "  no-such-step: {}\n")
    assert pipeline_runner.validate([str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "train.lr: got 'fast'" in err  # recipe level
    assert "stages.sft.train.max_steps: got 'many'" in err  # step level, same pass
    assert "stages.no-such-step: not a step of pipeline chart-demo" in err
