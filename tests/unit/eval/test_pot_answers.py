"""PoT answers: program extraction from model responses and ChartMoE's post-processing."""

from __future__ import annotations

import pytest

from mmjobs.eval.pot import SandboxLimits, chartmoe_answer, extract_program


@pytest.mark.parametrize(("response", "program"), [
    ("Sure:\n```python\nprint(1)\n```\nDone.", "\nprint(1)\n"),
    ("```python\na = 1\n```\n```python\nprint(2)\n```", "\na = 1\n"),  # the first one
    ("```\nprint(3)\n```", "print(3)\n"),  # untagged fence
    ("```py\nprint(4)\n```", "print(4)\n"),  # other tag: generic fence
    ("```text\nno\n```\n```python\nprint(5)\n```", "\nprint(5)\n"),  # python block wins
    ("print(6)", "print(6)"),  # no block: the whole response, as ChartMoE runs it
    ("```python\nprint(7)", "```python\nprint(7)"),  # unterminated: whole response
])
def test_extract_program(response: str, program: str) -> None:
    assert extract_program(response) == program


@pytest.mark.parametrize(("stdout", "answer"), [
    ("42\n", "42"),
    ("True\n", "Yes"),
    ("False", "No"),
    ("  3.5 \n\n", "3.5"),
    ("[True, False]\n", "[Yes, No]"),  # substring replacement, exactly as ChartMoE does
])
def test_chartmoe_answer(stdout: str, answer: str) -> None:
    assert chartmoe_answer(stdout) == answer


def test_limits_are_validated_together() -> None:
    with pytest.raises(ValueError, match=r"wall_s must be > 0.*cpu_s must be > 0"):
        SandboxLimits(wall_s=0, cpu_s=0)
