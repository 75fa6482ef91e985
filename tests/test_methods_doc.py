"""docs/methods.md against the code: its config fields and values, its links, and every link to it.

docs/methods.md names config fields the way users type them: backticked dotted names (`distill.objective`,
`ensemble.connect.join="add"`, `distill.easy.{rule, sharpness}`, `ensemble.*`) and command-line overrides
(`--config.active.m_estimate=informative`). The first part of a name picks its schema (the table at the
top of the page): a training run's `base_config()`, the pipeline's `cascade` section, the B-DISTIL
`ensemble` section, or an active-distillation config. Each field must exist there, and a value given
with it must pass that schema's own validator (set on an otherwise valid config). The code cites the page
as `docs/methods.md#<anchor>`; every such reference in the repository must name a heading of the page,
and a reference to the former `METHODS.md` (which is not in the repository) fails.
"""

from __future__ import annotations

import ast
import os
import re

import ml_collections
import pytest

from titans import config as config_lib
from titans.active import config as active_config
from titans.cascade import gates as gates_lib
from titans.config_builders import cascade_pipeline
from titans.ensemble import config as ensemble_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "methods.md")
# Backticked names ending like these are files (`cascade.json`), not fields.
FILE_SUFFIXES = ("json", "jsonl", "md", "py", "png", "npz", "npy", "txt", "yaml", "sh")
_NAME = r"[A-Za-z_]\w*(?:\.(?:[A-Za-z_]\w*|\*|\{[^}`]*\}))+"
_BACKTICKED = re.compile(r"`(?:--config\.)?(" + _NAME + r")(?:=([^`]+))?`")
_OVERRIDE = re.compile(r"--config\.(" + _NAME + r")=('[^']*'|\"[^\"]*\"|[^\s`]+)")


# --- The schemas, each with a config that validates and a function that checks one ----------------


def _valid_run():
    c = config_lib.base_config()
    c.total_steps = 1
    c.distill.teacher_workdir = "teacher"
    c.distill.cache.dir = "cache"
    return c


def _check_run(c):
    config_lib.validate(c)


def _valid_ensemble():
    e = ensemble_config.defaults()
    e.member = _valid_run()
    e.candidates = ml_collections.ConfigDict({"tiny": ensemble_config.model_entry("cnn")})
    e.no_resched = ml_collections.ConfigDict({"one": ensemble_config.model_entry("cnn")})
    return ml_collections.ConfigDict(dict(stages=ml_collections.ConfigDict(), stage_order=(), ensemble=e))


def _check_ensemble(c):
    ensemble_config.validate(c)


def _valid_active():
    c = active_config.defaults()
    c.teacher.workdir = "teacher"
    c.teacher.train = _valid_run()  # a teacher trained here, so that teacher.label_noise may be set
    c.teacher.train.distill.teacher_workdir = ""
    return c


def _check_active(c):
    active_config.validate(c)


def _cascade_fields_read() -> set[str]:
    """The `cascade` fields the evaluation reads (`cc.X`, `cc.get("X", ...)`): the section has no schema
    besides the defaults `cascade_pipeline` fills in and what each config file passes."""
    with open(os.path.join(ROOT, "titans", "cascade", "evaluate.py")) as f:
        source = f.read()
    return (set(re.findall(r"\bcc\.(\w+)", source)) | set(re.findall(r"\bcc\.get\(\"(\w+)\"", source))) - {"get"}


def _valid_cascade():
    c = cascade_pipeline(config_lib.base_config(), {}, [], temperature=4.0, alpha=0.9, cascade={})
    for field in _cascade_fields_read() - set(c.cascade):
        c.cascade[field] = c.cascade.gates if field == "runner_gates" else None  # None: any value may be set
    return c


def _check_cascade(c):
    # Its one enumerated choice is the gates: the registered ones, per-example and fitted.
    known = set(gates_lib.GATES) | set(gates_lib.FITTED_GATES)
    for field in ("gates", "runner_gates"):
        unknown = set(c.cascade[field]) - known
        if unknown:
            raise config_lib.ConfigError(f"cascade.{field}: unknown gates {sorted(unknown)}")


def _base_roots():
    return {k for k, v in config_lib.base_config().items() if isinstance(v, ml_collections.ConfigDict)}


# (name, roots, a valid config, its checker). Field paths are relative to the config's top level.
SCHEMAS = [
    ("run config (base_config)", _base_roots(), _valid_run, _check_run),
    ("cascade section", {"cascade"}, _valid_cascade, _check_cascade),
    ("ensemble section", {"ensemble"}, _valid_ensemble, _check_ensemble),
    ("active config", {"active", "teacher", "student", "dataset"}, _valid_active, _check_active),
]
ROOTS = set().union(*(roots for _, roots, _, _ in SCHEMAS))


def _expand(name: str) -> list[str]:
    """`a.{b, c}.d` -> [a.b.d, a.c.d]."""
    m = re.search(r"\{([^}]*)\}", name)
    if not m:
        return [name]
    return [x for part in m.group(1).split(",") for x in _expand(name[: m.start()] + part.strip() + name[m.end() :])]


def _parse_value(raw: str):
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":  # a shell-quoted override
        raw = raw[1:-1]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # an unquoted command-line string: --config.active.m_estimate=informative


def cited_fields(text: str) -> list[tuple[str, object]]:
    """(dotted field, value or None) for every config field `text` names, in order."""
    out = []
    for pattern in (_BACKTICKED, _OVERRIDE):
        for m in pattern.finditer(text):
            name, raw = m.group(1), m.group(2)
            if name.split(".")[0] not in ROOTS or name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                continue
            value = None if raw is None else _parse_value(raw)
            out.extend((n, value) for n in _expand(name) if (n, value) not in out)  # a backticked override: once
    return out


def _node(cfg, path: list[str]):
    """The value at `path`, or KeyError. An empty ConfigDict (a free-form section: model.kwargs,
    ensemble.candidates, teacher.train) accepts any name below it."""
    node = cfg
    for i, part in enumerate(path):
        if part == "*" and i == len(path) - 1:
            if not isinstance(node, ml_collections.ConfigDict):
                raise KeyError(".".join(path))
            return node
        if isinstance(node, ml_collections.ConfigDict) and not len(node):
            return None
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(".".join(path))
        node = node[part]
    return node


def check_field(name: str, value) -> str | None:
    """None if some schema whose roots include the field's has the field and accepts the value, else why not."""
    path = name.split(".")
    reasons = []
    for schema, roots, valid, check in SCHEMAS:
        if path[0] not in roots:
            continue
        cfg = valid()
        try:
            _node(cfg, path)
        except KeyError:
            reasons.append(f"not a field of the {schema}")
            continue
        if value is None or "*" in path:
            return None
        try:
            parent = _node(cfg, path[:-1])
            if parent is not None:
                parent[path[-1]] = value
            check(cfg)
        except (config_lib.ConfigError, TypeError, ValueError) as e:
            reasons.append(f"the {schema} refuses {value!r}: {e}")
            continue
        return None
    return f"{name}: " + "; ".join(reasons or ["no schema has this root"])


def test_every_config_field_and_value_in_methods_doc_exists_and_is_accepted():
    with open(DOC) as f:
        fields = cited_fields(f.read())
    # The page names several dozen; far fewer means the extraction broke, not that the page is right.
    assert len(fields) > 60, f"only {len(fields)} config fields found in docs/methods.md"
    assert sum(v is not None for _, v in fields) > 25
    problems = [p for p in (check_field(n, v) for n, v in fields) if p]
    assert not problems, "docs/methods.md names config fields or values the code does not have:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("distill.objective", "easy"),  # the value is `easy_weighted`
        ("distill.easy.rules", None),
        ("ensemble.connect.join", "sum"),
        ("active.m_estimate", "worst"),
        ("cascade.gates", ("msp", "oracle")),
        ("cascade.gate", None),
        ("teacher.noise", None),
    ],
)
def test_check_field_refuses_a_wrong_name_or_value(name, value):
    assert check_field(name, value) is not None


def test_cited_fields_reads_backticks_overrides_and_braces():
    text = (
        "`distill.easy.{rule, floor}` and `--config.distill.objective=defer` `cascade.json` `losses.centred`\n"
        'titans-train --config.distill.service.kinds=\'("gpu","cpu")\''
    )
    assert cited_fields(text) == [
        ("distill.easy.rule", None),
        ("distill.easy.floor", None),
        ("distill.objective", "defer"),
        ("distill.service.kinds", ("gpu", "cpu")),
    ]


# --- Links: anchors of the page, and paths the page names -------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (repeats get -1, -2, ...)."""
    anchors, seen, in_code = set(), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


_SCANNED = ("titans", "configs", "docs", "results", "benchmarks", "launch", "tests")
_REF = re.compile(r"(?<![\w/])(?:docs/)?methods\.md(?:#([\w-]+))?")
_OLD = re.compile(r"\bMETHODS\.md\b")


def _repository_text_files():
    top = [os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".md")]
    yield from top
    for d in _SCANNED:
        for base, dirs, files in os.walk(os.path.join(ROOT, d)):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
            for f in files:
                if f.endswith((".py", ".md", ".sh", ".toml", ".txt")):
                    yield os.path.join(base, f)


def dangling_references(path: str, text: str, anchors: set[str]) -> list[str]:
    """Where `text` cites the former METHODS.md, or docs/methods.md#anchor with no such heading."""
    rel = os.path.relpath(path, ROOT)
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if _OLD.search(line):
            out.append(f"{rel}:{no}: cites METHODS.md, which is not in the repository (use docs/methods.md#...)")
        for m in _REF.finditer(line):
            if m.group(1) and m.group(1) not in anchors:
                out.append(f"{rel}:{no}: docs/methods.md#{m.group(1)} names no heading of docs/methods.md")
    return out


def test_every_reference_to_methods_doc_resolves_to_a_heading():
    with open(DOC) as f:
        anchors = github_anchors(f.read())
    problems, refs = [], 0
    for path in _repository_text_files():
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        refs += sum(1 for m in _REF.finditer(text) if m.group(1))
        problems += dangling_references(path, text, anchors)
    assert refs >= 8, f"only {refs} docs/methods.md#anchor references found; the scan is broken"
    assert not problems, "\n".join(problems)


def test_dangling_references_flags_an_old_name_and_a_wrong_anchor():
    anchors = github_anchors("# Title\n## Cascades\n### Limits\n## B-DISTIL\n### Limits\n")
    assert anchors == {"title", "cascades", "limits", "b-distil", "limits-1"}
    text = "see docs/methods.md#cascades\nsee METHODS.md §1\nsee docs/methods.md#cascade\n[x](methods.md#b-distil)"
    assert dangling_references(os.path.join(ROOT, "x.py"), text, anchors) == [
        "x.py:2: cites METHODS.md, which is not in the repository (use docs/methods.md#...)",
        "x.py:3: docs/methods.md#cascade names no heading of docs/methods.md",
    ]


def test_every_repository_path_in_methods_doc_exists():
    with open(DOC) as f:
        text = f.read()
    paths = set(re.findall(r"(?<![\w/])((?:configs|docs|titans|benchmarks|tests|results)/[\w./-]*[\w/])", text))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"docs/methods.md names paths that do not exist: {missing}"
