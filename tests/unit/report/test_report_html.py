"""The report step's KFP UI outputs: the report's Markdown, and an HTML page whose plots are
inline (the UI's frame cannot follow the report's relative image links)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from types import SimpleNamespace

from mmjobs.report.html import report_html
from mmjobs.stages.report import ReportConfig, component
from tests.unit.report.conftest import Experiment


def test_report_component_writes_markdown_and_html_with_inline_plots(
        experiment: Experiment, tmp_path: Path) -> None:
    markdown = SimpleNamespace(path=str(tmp_path / "report.md"))
    page = SimpleNamespace(path=str(tmp_path / "report.html"))
    out = component(ReportConfig(experiment=experiment.name, parent_run_id=experiment.parent),
                    report=markdown, page=page)
    text = Path(markdown.path).read_text(encoding="utf-8")
    html = Path(page.path).read_text(encoding="utf-8")
    assert out and text.startswith("# ")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert linked and len(images) == len(linked)  # every plot of the report, inline
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "<table>" in html and "<th>" in html and 'src="loss.png"' not in html


def test_images_outside_the_report_folder_are_named_not_read(tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(b"\x89PNG not for the page")
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.md").write_text("# T\n\n![x](../secret.png)\n\n| a | b |\n|---|---|\n"
                                      "| 1 | <2> |\n", encoding="utf-8")
    html = report_html((folder / "report.md").read_text(encoding="utf-8"), folder, "T")
    # Only files of the report's own folder are read: the path is cut to its name.
    assert "base64" not in html and "[missing image: secret.png]" in html
    assert "<td>&lt;2&gt;</td>" in html and "<h1>T</h1>" in html
