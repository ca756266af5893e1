"""The review page: one self-contained HTML file for a batch of cases (``report.html`` of ``predict``,
``evaluation.html`` of ``evaluate``, the page of ``rank``).

Everything the page shows is inside the file: pictures as base64 ``data:`` URIs, the style sheet and a few
lines of plain JavaScript (filter and sort). Its Content-Security-Policy forbids every request that would
leave it (``default-src 'none'``), so it opens offline and in a hospital network, and never calls home.

The rows arrive in review order (flagged and least confident first); the page's script can show only the
flagged rows and sort by name, volume or score, and reads the same choices from the address's fragment
(``report.html#flagged``, ``#sort=volume``, ``#flagged&sort=name``) so that a link opens the view it names.
This module only writes HTML: the rows are built by :mod:`autoseg.visual.review_cases`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from string import Template

from autoseg.core.version import __version__

#: The page's layout version, in ``<meta name="autoseg-review-page">`` (tests and tools read it).
PAGE_VERSION = 1


@dataclass(frozen=True)
class Picture:
    """One embedded image: its caption, MIME type and bytes (a compressed thumbnail)."""

    caption: str
    mime: str
    data: bytes
    width: int
    height: int

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class Row:
    """One case of the page. ``table``: a header and rows of cells (plain text, escaped here); ``score``:
    the estimated (predict) or real (evaluate) Dice, None when unknown; ``note``: a line under the table."""

    case_id: str
    pictures: tuple[Picture, ...] = ()
    flags: tuple[tuple[str, str], ...] = ()  # (flag, reason)
    header: tuple[str, ...] = ()
    table: tuple[tuple[str, ...], ...] = ()
    volume_ml: float | None = None
    score: float | None = None
    note: str = ""

    @property
    def flagged(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class Page:
    """The page's head: its title, what ran (lines of ``label: value``) and what its score is called."""

    title: str
    run: tuple[tuple[str, str], ...]
    rows: Sequence[Row]
    score_name: str = "estimated Dice"
    legend: tuple[tuple[str, str], ...] = field(default=())  # (colour, label name)


def render_page(page: Page) -> str:
    """The page as one HTML string, rows in the order given (the review order)."""
    flagged = sum(row.flagged for row in page.rows)
    return PAGE.substitute(
        version=__version__,
        page_version=PAGE_VERSION,
        title=_text(page.title),
        run="".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in page.run),
        cases=len(page.rows),
        flagged=flagged,
        score_name=_text(page.score_name),
        legend=" ".join(
            f'<span class="swatch" style="border-color:{_text(c)}"></span>{_text(n)}' for c, n in page.legend
        ),
        rows="\n".join(_row(row, order) for order, row in enumerate(page.rows)),
        script=SCRIPT,
    )


def _row(row: Row, order: int) -> str:
    data = {
        "name": row.case_id,
        "order": str(order),
        "flagged": "1" if row.flagged else "0",
        "volume": "" if row.volume_ml is None else f"{row.volume_ml:.6g}",
        "score": "" if row.score is None else f"{row.score:.6g}",
    }
    attributes = " ".join(f'data-{k}="{_text(v)}"' for k, v in data.items())
    pictures = "".join(
        f'<figure><img src="{p.data_uri()}" width="{p.width}" height="{p.height}" alt="{_text(p.caption)}">'
        f"<figcaption>{_text(p.caption)}</figcaption></figure>"
        for p in row.pictures
    )
    flags = "".join(f"<li><b>{_text(f)}</b>: {_text(reason)}</li>" for f, reason in row.flags)
    badge = f'<span class="badge">{len(row.flags)} flag{"s" if len(row.flags) != 1 else ""}</span>' if row.flags else ""
    header = "".join(f"<th>{_text(h)}</th>" for h in row.header)
    cells = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in cells) + "</tr>" for cells in row.table)
    table = f"<table><thead><tr>{header}</tr></thead><tbody>{cells}</tbody></table>" if row.table else ""
    return (
        f'<article class="case{" flagged" if row.flagged else ""}" id="case-{_text(row.case_id)}" {attributes}>'
        f"<h2>{_text(row.case_id)} {badge}</h2>"
        f'<div class="body"><div class="pictures">{pictures}</div><div class="facts">{table}'
        f'<ul class="flags">{flags}</ul><p class="note">{_text(row.note)}</p></div></div></article>'
    )


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


#: The page. ``$name`` fields are filled by :func:`render_page` (already escaped); ``$$`` is a literal ``$``.
PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="autoseg $version">
<meta name="autoseg-review-page" content="$page_version">
<title>$title</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #1d1d1f; background: #fafafa; }
  header { position: sticky; top: 0; background: #fafafa; padding: 0.6em 0; border-bottom: 1px solid #ddd; z-index: 1; }
  h1 { font-size: 1.3em; margin: 0.2em 0; }
  h2 { font-size: 1.05em; margin: 0 0 0.4em; }
  table.run th { text-align: left; font-weight: normal; color: #666; padding-right: 1em; }
  .counts { font-size: 1.1em; margin: 0.4em 0; }
  .controls label { margin-right: 1.5em; }
  .swatch { display: inline-block; width: 1.4em; height: 0; border-top: 3px solid; margin: 0 0.3em 0.2em 0.8em; }
  article { background: #fff; border: 1px solid #ddd; border-left: 6px solid #3a7; border-radius: 4px;
            margin: 0.8em 0; padding: 0.6em 0.9em; }
  article.flagged { border-left-color: #d33; }
  article[hidden] { display: none; }
  .badge { background: #d33; color: #fff; border-radius: 0.8em; padding: 0 0.6em; font-size: 0.8em; }
  .body { display: flex; flex-wrap: wrap; gap: 1.2em; }
  .facts { flex: 1 1 22em; min-width: 22em; }
  figure { margin: 0 0 0.3em; }
  figcaption { font-size: 0.8em; color: #666; }
  img { image-rendering: auto; max-width: 100%; height: auto; }
  .facts table { border-collapse: collapse; font-size: 0.9em; }
  .facts th, .facts td { border-bottom: 1px solid #eee; padding: 0.15em 0.7em 0.15em 0; text-align: left; }
  ul.flags { color: #b00; padding-left: 1.2em; margin: 0.5em 0; }
  ul.flags:empty { display: none; }
  .note { color: #666; font-size: 0.85em; margin: 0.3em 0; }
</style>
</head>
<body>
<header>
<h1>$title</h1>
<table class="run">$run</table>
<p class="counts"><b id="case-count">$cases</b> cases, <b id="flagged-count">$flagged</b> flagged
  <span class="legend">$legend</span></p>
<form class="controls" id="controls">
  <label><input type="checkbox" id="flagged-only"> flagged only</label>
  <label>sort by <select id="sort">
    <option value="review">review order (flagged, then lowest $score_name)</option>
    <option value="name">name</option>
    <option value="volume">volume (largest first)</option>
    <option value="score">$score_name (lowest first)</option>
  </select></label>
  <span id="shown"></span>
</form>
</header>
<main id="cases">
$rows
</main>
<script>
$script
</script>
</body>
</html>
""")

#: Filter and sort, in plain JavaScript; the address's fragment (#flagged, #sort=name) sets both at load.
SCRIPT = """(function () {
  var list = document.getElementById("cases");
  var rows = Array.prototype.slice.call(list.querySelectorAll("article.case"));
  var only = document.getElementById("flagged-only");
  var sort = document.getElementById("sort");
  function number(row, key, missing) {
    var text = row.getAttribute("data-" + key);
    return text === "" ? missing : parseFloat(text);
  }
  var compare = {
    review: function (a, b) { return number(a, "order", 0) - number(b, "order", 0); },
    name: function (a, b) { return a.dataset.name < b.dataset.name ? -1 : a.dataset.name > b.dataset.name ? 1 : 0; },
    volume: function (a, b) { return number(b, "volume", -1) - number(a, "volume", -1); },
    score: function (a, b) { return number(a, "score", 2) - number(b, "score", 2); }
  };
  function apply() {
    var shown = 0;
    rows.slice().sort(compare[sort.value] || compare.review).forEach(function (row) {
      row.hidden = only.checked && row.dataset.flagged !== "1";
      shown += row.hidden ? 0 : 1;
      list.appendChild(row);
    });
    document.getElementById("shown").textContent = shown + " shown";
    document.body.setAttribute("data-view", (only.checked ? "flagged " : "") + sort.value);
  }
  location.hash.replace(/^#/, "").split("&").forEach(function (part) {
    var pair = part.split("=");
    if (pair[0] === "flagged") { only.checked = true; }
    if (pair[0] === "sort" && compare[pair[1]]) { sort.value = pair[1]; }
  });
  only.addEventListener("change", apply);
  sort.addEventListener("change", apply);
  apply();
})();"""
