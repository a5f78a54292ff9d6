"""A report folder (`report.md` and its PNG plots) as one self-contained HTML page.

The KFP UI shows a step's HTML output in a sandboxed frame that cannot follow the report's
relative image links, so the plots are inlined as `data:` URIs. Only what `build_report`
writes is rendered: headings, pipe tables, image lines and paragraphs.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:1em auto}"
          "table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
          "img{max-width:100%}")


def report_html(folder: Path, markdown_name: str = "report.md") -> str:
    """The page for the report in `folder`; an image the folder lacks (or one outside it)
    is shown as its name only."""
    lines = (folder / markdown_name).read_text(encoding="utf-8").splitlines()
    body: list[str] = []
    table: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            body.append(_table(table))
            table = []
        body.append(_line(line.strip(), folder))
    return (f"<!doctype html><html><head><meta charset='utf-8'><style>{_STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def _line(line: str, folder: Path) -> str:
    if not line:
        return ""
    heading = re.match(r"^(#{1,6})\s+(.*)$", line)
    if heading:
        level = len(heading.group(1))
        return f"<h{level}>{html.escape(heading.group(2))}</h{level}>"
    image = _IMAGE.match(line)
    if image:
        alt, name = image.groups()
        path = (folder / name).resolve()
        if path.parent == folder.resolve() and path.suffix == ".png" and path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            return (f"<figure><img alt='{html.escape(alt, quote=True)}' "
                    f"src='data:image/png;base64,{data}'><figcaption>{html.escape(name)}"
                    "</figcaption></figure>")
        return f"<p>[{html.escape(alt)}: {html.escape(name)}]</p>"
    return f"<p>{html.escape(line)}</p>"


def _table(rows: list[str]) -> str:
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    cells = [r for r in cells if not all(re.fullmatch(r":?-+:?", c) for c in r if c)]
    if not cells:
        return ""
    head, *rest = cells
    out = ["<table><tr>", *(f"<th>{html.escape(c)}</th>" for c in head), "</tr>"]
    for row in rest:
        out += ["<tr>", *(f"<td>{html.escape(c)}</td>" for c in row), "</tr>"]
    return "".join([*out, "</table>"])
