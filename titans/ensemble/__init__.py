"""Progressive ensemble distillation (B-DISTIL, docs/methods.md#b-distil): an anytime ensemble of small students.

weights.py   the weight player (multiplicative updates over examples or example-class pairs)
members.py   the connection between members, frozen earlier members, loading an ensemble
anytime.py   anytime inference: vmapped threshold/budget sweeps, and the naive loop
runner.py    the rounds with FIND-WL, the resched / no-resched baselines, ensemble.json
report.py    aggregation over seeds into a Markdown report

from titans.ensemble import load
ens = load("WORKDIR", variant="bdistil")   # an nnx.Module: ens(x) = f_1(x) + ... + f_W(x)
"""

import json
import os

from titans import runs
from titans.ensemble import members
from titans.ensemble.members import ConnectedMember, Ensemble


def load(workdir: str, variant: str = "bdistil"):
    """The ensemble of a B-DISTIL run (`variant` in bdistil, bdistil_noconn, resched, no_resched)
    as one `Ensemble` module, plus its dataset info: (ensemble, info)."""
    path = os.path.join(workdir, "ensemble.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no ensemble.json: run the B-DISTIL config there first.")
    with open(path) as f:
        result = json.load(f)
    if variant not in result["variants"]:
        raise ValueError(f"{workdir} has no variant {variant!r}; it has {sorted(result['variants'])}.")
    specs = result["variants"][variant]["members"]
    if not specs:
        raise ValueError(
            f"variant {variant!r} of {workdir} has no members ({result['variants'][variant].get('stopped')})."
        )
    info = runs.RunDir(specs[0]["workdir"]).info
    layer = result.get("connect_layer", "") if variant == "bdistil" else ""
    return members.load_ensemble(specs, info, layer=layer), info


__all__ = ["ConnectedMember", "Ensemble", "load"]
