"""report.html: the report as one self-contained page, its plots embedded.

MLflow's artifact viewer renders Markdown but shows `![loss](loss.png)` as literal text (it
neither resolves relative images nor accepts `data:` URIs there), while it renders an `.html`
artifact as a page. So the report is also written as HTML with every plot inlined as a base64
`data:` URI: it shows its images in MLflow, in a browser opened on the store folder, or mailed
on its own. `report.md` keeps relative image paths (they resolve next to it on disk and in
Markdown viewers that read files).

Only the Markdown the report itself writes is converted (`build._markdown`): headings,
paragraphs, `- ` lists, pipe tables, images alone on a line, inline code.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_CODE = re.compile(r"`([^`]+)`")
_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#1b1b1b}
table{border-collapse:collapse;margin:1em 0;font-size:90%}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}
img{max-width:100%;display:block;margin:1em 0}code{background:#f3f3f3;padding:0 3px}"""


def report_html(markdown: str, folder: Path, title: str) -> str:
    """The report's Markdown as an HTML page; images named in it are read from `folder` and
    embedded (a missing file stays a visible `[missing image: name]` note)."""
    body: list[str] = []
    for block in markdown.strip().split("\n\n"):
        lines = block.splitlines()
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            body.append(f"<h{level}>{_inline(block[level:].strip())}</h{level}>")
        elif all(line.startswith("|") for line in lines):
            body.append(_table(lines))
        elif all(line.startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
            body.append(f"<ul>{items}</ul>")
        elif len(lines) == 1 and (m := _IMAGE.match(block)):
            body.append(_image(m.group(1), folder / Path(m.group(2)).name))  # ours, no dirs
        else:
            body.append(f"<p>{'<br>'.join(_inline(line) for line in lines)}</p>")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _inline(text: str) -> str:
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))


def _table(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    separator = len(rows) > 1 and all(c and set(c) <= set(":- ") for c in rows[1])
    head, rest = rows[0], rows[2:] if separator else rows[1:]
    cells = "".join(f"<th>{_inline(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                   for row in rest)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _image(alt: str, path: Path) -> str:
    if not path.is_file() or path.suffix.lower() != ".png":
        return f"<p>[missing image: {html.escape(path.name)}]</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" data-file="{html.escape(path.name)}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption><code>{html.escape(path.name)}</code></figcaption></figure>")
