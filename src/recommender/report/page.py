"""The report's HTML page: escaping, the small markup builders, and the page they assemble into.

Every string reaches the page through `esc` unless it is `Raw`, markup built here from parts
that were escaped already, so text from the data (titles, ids, paths) is always HTML-escaped.
Figures are embedded as base64 data URIs and the CSS is inline: the single HTML file refers to
no external resource and can be mailed.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

SECTIONS = {
    "summary": "Summary",
    "training": "Training curves",
    "metrics": "Test metrics",
    "branches": "GMF vs MLP branches",
    "item-map": "Item embedding map",
    "popularity": "Popularity bias and coverage",
    "activity": "Metrics by user activity",
    "samples": "Sample recommendations",
}


class Raw(str):
    """Markup the report built itself; every other string is escaped on the way in."""


def esc(value: object) -> str:
    """`value` as HTML text: escaped, unless it is Raw markup already."""
    return value if isinstance(value, Raw) else html.escape(str(value), quote=True)


def table(header: Sequence[object], rows: Sequence[Sequence[object]], cls: str = "") -> Raw:
    attr = f' class="{esc(cls)}"' if cls else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Raw(f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def img(png: bytes, alt: str) -> Raw:
    data = base64.b64encode(png).decode("ascii")
    return Raw(f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">')


def para(text: object) -> Raw:
    return Raw(f"<p>{esc(text)}</p>")


def bullets(items: Sequence[object]) -> Raw:
    return Raw("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")


def fmt(value: float | None, digits: int = 4) -> str:
    """A number with `digits` decimals; "n/a" for a missing or NaN one."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.0%}"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;
max-width:1140px;margin:2em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}nav a{margin-right:1em}img{max-width:100%;height:auto}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
table.left td{text-align:left}.muted{color:#777}
"""


@dataclass
class Page:
    """The sections as they are built, and the figures to write beside the HTML."""

    title: str
    parts: dict[str, list[Raw]] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)

    def add(self, section: str, *items: Raw) -> None:
        self.parts.setdefault(section, []).extend(items)

    def figure(self, section: str, name: str, png: bytes, alt: str) -> None:
        self.figures[name] = png
        self.add(section, img(png, alt))

    def html(self) -> str:
        nav = " ".join(f'<a href="#{key}">{esc(title)}</a>' for key, title in SECTIONS.items())
        body = "".join(
            f'<section id="{key}"><h2>{esc(title)}</h2>{"".join(self.parts.get(key, []))}</section>'
            for key, title in SECTIONS.items()
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{esc(self.title)}</h1><nav>{nav}</nav>{body}</body></html>\n"
        )
