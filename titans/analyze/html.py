"""A self-contained HTML report: tables and PNG plots embedded as data URIs, no external files.

When the page has loaded, a small script sets the title to ``report-ok:<decoded>/<images>`` so a
headless browser can check that every embedded image decodes (tests/test_analyze.py does).
"""

from __future__ import annotations

import base64
import html as _html

from titans import paths

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:3px 8px;font-size:.9em}
th{background:#f4f4f4} figure{display:inline-block;margin:.5em;vertical-align:top}
figcaption{font-size:.85em;color:#555} img{max-width:520px;border:1px solid #eee}
"""

_CHECK = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.title = 'report-ok:' + ok + '/' + imgs.length;
});
"""


def _table(rows) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{_html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(title: str, png: str) -> str:
    raw = paths.resolve(png).read_bytes()
    width = int.from_bytes(raw[16:20], "big") if raw[:8] == b"\x89PNG\r\n\x1a\n" else 0
    style = ' style="max-width:100%"' if width > 800 else ""  # wide plots get the page's width
    data = base64.b64encode(raw).decode()
    return (
        f'<figure><img alt="{_html.escape(title)}"{style} src="data:image/png;base64,{data}">'
        f"<figcaption>{_html.escape(title)}</figcaption></figure>"
    )


def write_report(path: str, title: str, summary_rows, pngs: list[tuple[str, str]], sections) -> str:
    """pngs: [(caption, file)]; sections: [(name, [items])] from titans.analyze.sections."""
    parts = [f"<h1>{_html.escape(title)}</h1>", _table(summary_rows)]
    if pngs:
        parts.append("<h2>Plots</h2>" + "".join(_figure(t, p) for t, p in pngs if paths.exists(p)))
    for name, items in sections:
        parts.append(f"<h2>{_html.escape(name)}</h2>")
        for item in items:
            if "png" in item:
                parts.append(_figure(item["title"], item["png"]))
            elif "table" in item:
                parts.append(f"<h3>{_html.escape(item['title'])}</h3>" + _table(item["table"]))
            else:
                parts.append(f"<p><b>{_html.escape(item['title'])}</b>: {_html.escape(str(item.get('text', '')))}</p>")
    doc = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script>{_CHECK}</script></head><body>{''.join(parts)}</body></html>"
    )
    paths.write_text(path, doc)  # local or in a bucket
    return path
