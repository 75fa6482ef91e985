"""Report sections that methods plug in: a function of a run (or pipeline) directory returning items.

    from titans.analyze import register_section

    @register_section("my_method")
    def my_section(workdir: str) -> list[dict] | None:   # workdir: a local path or a URL (gs://...)
        if not paths.exists(paths.join(workdir, "my_method.json")):
            return None                       # not applicable to this run
        return [{"title": "accuracy vs cost", "png": paths.join(workdir, "plot.png")},
                {"title": "key numbers", "table": [["metric", "value"], ["acc", "0.91"]]}]

Each item has a ``title`` and one of ``png`` (a file, local or in a bucket, embedded in the HTML), ``table`` (rows of
cells, the first row the header) or ``text``. Sections run in registration order; one that raises
is reported in the page as an error rather than stopping the analysis.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from titans import paths

SECTIONS: dict[str, Callable[[str], list[dict] | None]] = {}


def register_section(name: str):
    """Decorator: adds a report section under ``name`` (replacing one of the same name)."""

    def wrap(fn):
        SECTIONS[name] = fn
        return fn

    return wrap


@register_section("cascade")
def cascade_section(workdir: str):
    """A cascade pipeline's evaluation (titans/cascade/evaluate.py): its plots and key numbers."""
    text = paths.read_text(paths.join(workdir, "cascade.json"))
    if text is None:
        return None
    res = json.loads(text)
    t = res["teacher"]
    rows = [["student", "gate", "student acc", "acc @ 25% teacher FLOPs", "acc @ 50%", "FLOPs to reach teacher"]]
    for name, s in res["students"].items():
        for gate, g in s["gates"].items():
            reach = g.get("reach_teacher")
            rows.append(
                [
                    name,
                    gate,
                    f"{s['test_accuracy']:.4f}",
                    f"{g['at_cost_fraction']['0.25'].get('test_accuracy', float('nan')):.4f}",
                    f"{g['at_cost_fraction']['0.5'].get('test_accuracy', float('nan')):.4f}",
                    f"{100 * reach['flops_fraction_of_teacher']:.1f}%" if reach else "not reached",
                ]
            )
    items = [
        {
            "title": f"Cascade: teacher test accuracy {t['test_accuracy']:.4f}, "
            f"{t['flops_per_example'] / 1e6:.2f} MFLOPs/example",
            "table": rows,
        }
    ]
    for png in _pngs(workdir, "cascade_*.png"):
        items.append({"title": os.path.basename(png)[:-4].replace("_", " "), "png": png})
    return items


@register_section("method_plots")
def method_plots_section(workdir: str):
    """Plots a method wrote into the run directory itself (ensemble, active, ... curves)."""
    pngs = [p for p in _pngs(workdir, "*.png") if not os.path.basename(p).startswith("cascade_")]
    if not pngs:
        return None
    items = []
    for name in ("ensemble.json", "active.json", "bdistil.json"):
        if paths.exists(paths.join(workdir, name)):
            items.append({"title": f"{name} is in this directory", "text": paths.join(workdir, name)})
    return items + [{"title": os.path.basename(p)[:-4].replace("_", " "), "png": p} for p in pngs]


def _pngs(workdir: str, pattern: str) -> list[str]:
    """The files in `workdir` (local or a bucket) whose names match `pattern`, sorted."""
    return sorted(str(p) for p in paths.resolve(workdir).glob(pattern))
