"""The pages describe the present, and their links lead somewhere.

- No hand-written page (README.md, docs/**/*.md) holds a calendar date: what changed when belongs in git
  history and CHANGELOG.md. The generated pages (docs/benchmarks.md, docs/results/*), which carry
  measurement dates as data, are exempt; so is a date inside a file name (`..._2026-12-04.json`).
- Every relative link of README.md and docs/*.md names an existing file, and a heading of it where the link
  gives `#anchor`.
- The outputs docs/serving.md prints: its second table is what benchmarks/serving_table.py makes of the
  raw outputs (the first is checked by tests/test_results.py), and the 400 its curl example shows is the
  service's own answer.
"""

from __future__ import annotations

import glob
import os
import re
from urllib.parse import unquote

import pytest
from helpers import load_benchmark
from test_methods_doc import github_anchors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATED = ("docs/benchmarks.md", "docs/results/")

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_MONTHS_SHORT = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
# A date is not part of a longer token: `serving_2026-12-04.json` names a file, and is allowed.
_ISO = re.compile(r"(?<![\w.-])\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])(?![\w-])")
_WORDS = re.compile(rf"\b(?:(?:{_MONTHS}|{_MONTHS_SHORT})\.? \d{{1,2}}(?:st|nd|rd|th)?\b|\d{{1,2}} (?:{_MONTHS})\b)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def hand_written_pages() -> list[str]:
    pages = [os.path.join(ROOT, "README.md")]
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if not rel.startswith(GENERATED):
            pages.append(path)
    return pages


def dates_in(text: str) -> list[tuple[int, str]]:
    """(line number, date) for every calendar date of `text`: YYYY-MM-DD, or "December 4" / "4 December"."""
    found = []
    for no, line in enumerate(text.splitlines(), 1):
        found += [(no, m.group()) for m in _ISO.finditer(line)]
        found += [(no, m.group()) for m in _WORDS.finditer(line)]
    return found


def _without_code(text: str) -> str:
    """The text with fenced blocks and inline code blanked (kept as empty lines, so line numbers hold)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def broken_links(path: str, text: str) -> list[str]:
    """Where a relative link of the Markdown page `path` leads nowhere: a missing file, or an `#anchor`
    that names no heading of the page it points to."""
    rel = os.path.relpath(path, ROOT)
    problems = []
    for no, line in enumerate(_without_code(text).splitlines(), 1):
        targets = [m.group(1) for m in _LINK.finditer(line)] + [m.group(1) for m in _REF_DEF.finditer(line)]
        for target in targets:
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, gs:
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), unquote(file))) if file else path
            if not os.path.exists(dest):
                problems.append(f"{rel}:{no}: {target}: no file {os.path.relpath(dest, ROOT)}")
            elif anchor and dest.endswith(".md"):
                with open(dest, encoding="utf-8") as f:
                    if anchor not in github_anchors(f.read()):
                        problems.append(f"{rel}:{no}: {target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    return problems


def test_no_hand_written_page_holds_a_calendar_date():
    """README.md and docs/ (but the generated pages) say what is, not when it became so."""
    pages = hand_written_pages()
    assert len(pages) >= 10, f"found only {len(pages)} pages; the scan is broken"
    problems = []
    for path in pages:
        with open(path, encoding="utf-8") as f:
            problems += [f"{os.path.relpath(path, ROOT)}:{no}: {d}" for no, d in dates_in(f.read())]
    assert not problems, "dates belong in git history and CHANGELOG.md:\n" + "\n".join(problems)


def test_every_relative_link_resolves_to_a_file_and_heading():
    pages = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    problems, links = [], 0
    for path in pages:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        links += len(_LINK.findall(_without_code(text)))
        problems += broken_links(path, text)
    assert links >= 20, f"found only {links} links; the scan is broken"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "line, dates",
    [
        ("measured 2026-12-04 on 2 cores", ["2026-12-04"]),
        ("Measured on December 4, then again on Dec. 5th", ["December 4", "Dec. 5th"]),
        ("finished on 3 December", ["3 December"]),
        ("raw output `serving_fmnist_cnn_2026-12-04.json`, step 2026-1-4, version 0.2.0", []),
        ("May the teacher defer 12 rows", []),
    ],
)
def test_dates_in_finds_dates_but_not_file_names(line, dates):
    assert [d for _, d in dates_in(line)] == dates


def test_broken_links_finds_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n## Its part\n```\n# not a heading\n```\n")
    page.write_text(
        "# Page\n"
        "[ok](other.md#its-part) [self](#page) [web](https://example.com/x.md) ![img](other.md)\n"
        "[gone](missing.md) [bad anchor](other.md#not-a-heading)\n"
        "`[in code](missing2.md)`\n```\n[fenced](missing3.md)\n```\n"
        "[ref]: nowhere.md\n"
    )
    problems = [p.split(": ", 1)[1] for p in broken_links(str(page), page.read_text())]
    assert problems == [
        f"missing.md: no file {os.path.relpath(tmp_path / 'missing.md', ROOT)}",
        f"other.md#not-a-heading: no heading #not-a-heading in {os.path.relpath(tmp_path / 'other.md', ROOT)}",
        f"nowhere.md: no file {os.path.relpath(tmp_path / 'nowhere.md', ROOT)}",
    ]


def _serving_page() -> str:
    with open(os.path.join(ROOT, "docs", "serving.md"), encoding="utf-8") as f:
        return f.read()


def test_the_serving_page_holds_the_generated_table_of_the_resnet20_teacher():
    tables = load_benchmark("serving_table.py")
    assert tables.table(tables.HOP_RUNS, tables.HOP_HEADER) in _serving_page()


def test_the_400_the_serving_page_prints_is_the_services_answer():
    """The curl example of a body that is not JSON shows the reason the service gives, verbatim."""
    pytest.importorskip("ray.serve")
    from titans import serve  # deferred: Ray Serve is the optional `serve` extra

    page = _serving_page()
    m = re.search(r"-d 'not json'\n# (\{.*\})\s+\(HTTP 400", page)
    assert m, "docs/serving.md no longer shows the 400 of its 'not json' example"
    with pytest.raises(serve.BadRequest) as e:
        serve.parse_images(b"not json", (28, 28, 1), 256, "application/json")
    response = serve.error_response(e.value)
    assert (response.status_code, response.body.decode()) == (400, m.group(1))
