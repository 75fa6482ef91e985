"""The `ensemble` section of a B-DISTIL config: its fields, defaults and checks.

A B-DISTIL config is a pipeline config (`stages`, `stage_order`: e.g. a teacher to train first,
or none when the teacher run exists) plus an `ensemble` section:

  member          a full run config (titans.config.base_config) for every member: data, optimizer,
                  duration, distill.teacher_workdir ("@stage" or a path), distill.loss/alpha/temperature;
  candidates      FIND-WL's candidate architectures: name -> {name, kwargs[, epochs]}; tried smallest
                  first (by XLA-measured FLOPs); `epochs` (optional) is that architecture's own training
                  budget (the member run's total_epochs), else `member`'s duration applies;
  rounds          the most members;
  weights         "example" or "example_class": what the weight player weighs;
  eta, mix        the weight player's step size and uniform mix;
  gamma           the weak-learning condition: a member must remove this fraction of the weighted
                  residual loss left by the members before it;
  edge_split      where FIND-WL measures that edge: "" = on the members' own training rows
                  (member.dataset.train_split), or a split of rows the members do not train on (e.g.
                  "train[80%:90%]" with member.dataset.train_split "train[:80%]"; checked disjoint at run
                  time): the weight player weighs those rows too, and only their edge accepts a candidate;
  barrier_weight, barrier_t   the log-barrier relaxation of that condition in the member's loss;
  connect.layer   "" (no connection) or the previous member's activation to feed forward
                  ("features", "stage2", ...); connect.join "concat" | "add"; connect.width;
  variants        which of bdistil, bdistil_noconn, resched, no_resched to run;
  no_resched      candidate single students for the no-resched curve (for each B-DISTIL prefix, the
                  one whose FLOPs are closest to the prefix's is trained), entries as in `candidates`;
  val_split, test_split, predict_batch_size, num_thresholds, budgets (fractions of the full
                  ensemble's FLOPs for the anytime budget curves).
"""

from __future__ import annotations

import ml_collections

from titans import config as config_lib
from titans.ensemble.members import JOINS
from titans.ensemble.weights import WEIGHT_MODES

VARIANTS = ("bdistil", "bdistil_noconn", "resched", "no_resched")
_FREE_FORM = ("candidates", "no_resched", "member")


def defaults() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.member = config_lib.base_config()
    e.candidates = ml_collections.ConfigDict()
    e.rounds = 4
    e.weights = "example"
    e.eta = 1.0
    e.mix = 0.1
    e.gamma = 0.05
    e.edge_split = ""
    e.barrier_weight = 0.1
    e.barrier_t = 5.0
    e.connect = ml_collections.ConfigDict(dict(layer="features", join="concat", width=16))
    e.variants = VARIANTS
    e.no_resched = ml_collections.ConfigDict()
    e.val_split = "train[90%:]"
    e.test_split = "test"
    e.predict_batch_size = 1000
    e.num_thresholds = 101
    e.budgets = (0.25, 0.5, 0.75, 1.0)
    return e


def model_entry(name: str, *, epochs: float | None = None, **kwargs) -> ml_collections.ConfigDict:
    """A candidate architecture: {name, kwargs} as in a run config's `model` section, plus `epochs`, its own
    training budget, when given."""
    entry = ml_collections.ConfigDict(dict(name=name, kwargs=ml_collections.ConfigDict(kwargs)))
    if epochs is not None:
        entry.epochs = float(epochs)
    return entry


def model_only(entry) -> dict:
    """{name, kwargs} of a candidate entry (a ConfigDict or dict), without its training budget."""
    d = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    return {"name": d["name"], "kwargs": dict(d.get("kwargs") or {})}


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        name = prefix + k
        if isinstance(v, ml_collections.ConfigDict) and k not in _FREE_FORM:
            out.update(_flat(v, name + "."))
        else:
            out[name] = v
    return out


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks config.ensemble; raises config_lib.ConfigError naming the field (and close matches)."""
    if "ensemble" not in config:
        raise config_lib.ConfigError("the config has no `ensemble` section")
    e = config.ensemble
    known = _flat(defaults())
    for name in _flat(e):
        if name not in known:
            raise config_lib._unknown_error("ensemble." + name, ["ensemble." + k for k in known], "the config")
    where = "ensemble"

    def fail(msg):
        raise config_lib.ConfigError(f"{where}: {msg}")

    if "member" not in e:
        fail("`member` (the run config every member trains with) is missing")
    config_lib.validate(e.member, where="ensemble.member")
    if not e.member.distill.teacher_workdir:
        fail("member.distill.teacher_workdir must name the teacher ('@stage' or a run directory)")
    if not e.get("candidates"):
        fail("`candidates` (FIND-WL's architectures, smallest first) is empty")
    for group in ("candidates", "no_resched"):
        for cname, cand in (e.get(group) or {}).items():
            if not isinstance(cand, ml_collections.ConfigDict) or "name" not in cand:
                fail(f"{group}.{cname} must be a {{name, kwargs}} model entry (see model_entry)")
            extra = set(cand) - {"name", "kwargs", "epochs"}
            if extra:
                fail(f"{group}.{cname} has unknown field(s) {sorted(extra)}; expected name, kwargs and epochs")
            if "epochs" in cand and not (isinstance(cand.epochs, (int, float)) and cand.epochs > 0):
                fail(f"{group}.{cname}.epochs={cand.epochs!r} must be a number > 0 (the member's total_epochs)")
    _check_edge_split(e, fail)
    if e.get("weights", "example") not in WEIGHT_MODES:
        fail(f"weights={e.weights!r} is not one of {list(WEIGHT_MODES)}")
    if e.get("rounds", 1) < 1:
        fail(f"rounds={e.rounds} must be >= 1")
    if not 0.0 <= e.get("gamma", 0.05) < 1.0:
        fail(f"gamma={e.gamma} must be in [0, 1)")
    if e.get("eta", 1.0) < 0 or not 0.0 <= e.get("mix", 0.1) <= 1.0:
        fail("eta must be >= 0 and mix in [0, 1]")
    if e.get("barrier_weight", 0.1) < 0 or e.get("barrier_t", 5.0) <= 0:
        fail("barrier_weight must be >= 0 and barrier_t > 0")
    if "connect" in e and e.connect.get("join", "concat") not in JOINS:
        fail(f"connect.join={e.connect.join!r} is not one of {list(JOINS)}")
    for v in e.get("variants", VARIANTS):
        if v not in VARIANTS:
            fail(f"variants names {v!r}; expected some of {list(VARIANTS)}")
    if "no_resched" in e.get("variants", VARIANTS) and not e.get("no_resched"):
        fail("variant no_resched needs `no_resched` candidate architectures")
    return config


def _check_edge_split(e, fail) -> None:
    """The edge split, when given, is none of the member's training split, the validation or the test split."""
    edge = e.get("edge_split", "")
    if not isinstance(edge, str):
        fail(f"edge_split={edge!r} must be a split name ('' = the members' training rows)")
    if not edge:
        return
    for field, other in (
        ("member.dataset.train_split", e.member.dataset.train_split),
        ("val_split", e.get("val_split", "")),
        ("test_split", e.get("test_split", "")),
    ):
        if edge == other:
            fail(f"edge_split={edge!r} is the same split as {field}: the edge needs rows the members do not train on")


def section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.ensemble completed with defaults for the fields it leaves out."""
    validate(config)
    full = defaults()
    given = config.ensemble
    for key in given:
        if key == "connect":
            for k in given.connect:
                full.connect[k] = given.connect[k]
        else:
            full[key] = given[key]
    return full
