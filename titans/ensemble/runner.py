"""The B-DISTIL run: rounds of the boosting game with FIND-WL, the baselines, and the evaluation.

    run(config, workdir)   # config: a pipeline config with an `ensemble` section (see config.py)

Layout under WORKDIR (after the pipeline's stages, e.g. WORKDIR/teacher):
  bdistil/, bdistil_noconn/   state.json (members, FIND-WL log, why it stopped), weights_round{w}.npy
                              (the weight player's weights for round w over the training rows;
                              edge_weights_round{w}.npy over the edge split's rows when there is one),
                              round{w}/{candidate}/ (a member run: an ordinary Titans run directory)
  resched/member{i}/          independently distilled members of the B-DISTIL members' sizes
  no_resched/{name}/          the no-resched curve: per B-DISTIL prefix, the single student closest in FLOPs
  teacher_logits_*.npy        the teacher's logits per split (computed once)
  ensemble.json, ensemble.md  accuracy vs members and vs cumulative FLOPs, anytime curves; ensemble.json
                              also holds the whole config and the code revision (titans.provenance)
Every member is trained by `titans.train.train_and_evaluate` (with a Method that adds the
frozen earlier members, the weight player's weights and the weak-learner loss). Rerunning the
command resumes: finished rounds are read from state.json, an interrupted member run resumes from
its checkpoint, and finished candidate runs are not retrained.
"""

from __future__ import annotations

import copy
import io
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from titans import config as config_lib
from titans import data as data_lib
from titans import logs, losses, parallel, paths, runs
from titans.ensemble import anytime
from titans.ensemble import config as ens_config
from titans.ensemble import members as mem
from titans.ensemble import weights as wp
from titans.provenance import provenance
from titans.runs import read_json, write_json
from titans.train import Method, ensure_trained


class Context:
    """What every part of a run shares: config, data, teacher logits, mesh."""

    def __init__(self, config, workdir: str):
        self.e = ens_config.section(config)
        self.workdir = paths.text(workdir)  # a local path made absolute; a URL (gs://...) kept as it is
        member = ml_collections.ConfigDict(copy.deepcopy(self.e.member.to_dict()))
        ref = member.distill.teacher_workdir
        if ref.startswith("@"):
            member.distill.teacher_workdir = paths.join(self.workdir, ref[1:])
        self.member = member
        self.info = data_lib.dataset_info(member.dataset.name)
        data_dir = member.dataset.data_dir or None
        self.sources = {
            "train": data_lib.get_source(member.dataset.name, member.dataset.train_split, data_dir=data_dir),
            "val": data_lib.get_source(member.dataset.name, self.e.val_split, data_dir=data_dir),
            "test": data_lib.get_source(member.dataset.name, self.e.test_split, data_dir=data_dir),
        }
        if self.e.edge_split:
            check_edge_rows(member.dataset.name, self.e.edge_split, member.dataset.train_split, data_dir)
            self.sources["edge"] = data_lib.get_source(member.dataset.name, self.e.edge_split, data_dir=data_dir)
        self.mesh = parallel.make_mesh()
        self.bs = int(self.e.predict_batch_size)
        parallel.check_batch_size(self.bs, self.mesh)
        self.teacher, _ = runs.load_teacher(
            member.distill.teacher_workdir, self.info, dtype=jnp.float32, step=member.distill.teacher_step
        )
        self._teacher_logits = {}
        self.labels = {}
        self._buckets = None

    def buckets(self) -> dict | None:
        """Text: {length bucket: test rows} (`members.length_buckets`), where FLOPs are measured; images: None."""
        if self.info.modality != "text":
            return None
        if self._buckets is None:
            tokens, _ = runs.split_arrays(self.sources["test"], self.info)
            self._buckets = mem.length_buckets(tokens, self.info.image_shape[0])
        return self._buckets

    def flops(self, module) -> float:
        """XLA's FLOPs per example of `module`: at the input shape, or for text the mean over the test rows at
        their length buckets (the lengths they run at, batches sorted by length)."""
        return mem.flops_per_example(module, self.info.image_shape, self.buckets())

    def teacher_logits(self, split: str) -> np.ndarray:
        if split not in self._teacher_logits:
            path = paths.join(self.workdir, f"teacher_logits_{split}.npy")
            lpath = paths.join(self.workdir, f"labels_{split}.npy")
            if paths.exists(path) and paths.exists(lpath):
                logits, labels = load_npy(path), load_npy(lpath)
            else:
                logits, labels = runs.predict_split(
                    runs.logits_fn, self.teacher, self.sources[split], self.info, batch_size=self.bs, mesh=self.mesh
                )
                paths.makedirs(self.workdir)
                save_npy(path, logits)
                save_npy(lpath, labels)
            self._teacher_logits[split], self.labels[split] = logits, labels
        return self._teacher_logits[split]

    def member_config(self, name: str, model_entry, seed: int) -> ml_collections.ConfigDict:
        """The run config of one member: `member` with the entry's model and, if it has one, its epochs."""
        c = ml_collections.ConfigDict(copy.deepcopy(self.member.to_dict()))
        c.name = name
        c.seed = int(seed)
        model = ens_config.model_only(model_entry)
        c.model.name = model["name"]
        c.model.kwargs = ml_collections.ConfigDict(model["kwargs"])
        epochs = model_entry.get("epochs")
        if epochs:
            c.total_epochs, c.total_steps = float(epochs), 0
        return c


def _split_rows(dataset: str, split: str, data_dir) -> dict[str, list[tuple[int, int]]]:
    """{base split: [(first row, end row), ...]} of a TFDS split expression such as "train[:80%]+test"."""
    names = {i.splitname for i in tfds.core.ReadInstruction.from_spec(split).to_absolute(_AnySize())}
    sizes = {n: _Size(len(data_lib.get_source(dataset, n, data_dir=data_dir))) for n in names}
    out: dict[str, list[tuple[int, int]]] = {}
    for i in tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes):
        n = sizes[i.splitname].num_examples
        out.setdefault(i.splitname, []).append((i.from_ or 0, n if i.to is None else i.to))
    return out


class _Size:
    def __init__(self, n: int):
        self.num_examples = n


class _AnySize(dict):
    """A split-size table that answers any name (only the names are wanted)."""

    def __getitem__(self, name):
        return _Size(1)

    def __contains__(self, name):
        return True


def check_edge_rows(dataset: str, edge_split: str, train_split: str, data_dir) -> None:
    """Refuses an edge split that shares rows with the members' training split (ConfigError naming both)."""
    edge, train = _split_rows(dataset, edge_split, data_dir), _split_rows(dataset, train_split, data_dir)
    shared = sum(
        max(0, min(b1, b2) - max(a1, a2))
        for name in edge.keys() & train.keys()
        for a1, b1 in edge[name]
        for a2, b2 in train[name]
    )
    if shared:
        raise config_lib.ConfigError(
            f"ensemble.edge_split={edge_split!r} shares {shared} rows of {dataset} with "
            f"ensemble.member.dataset.train_split={train_split!r}: the edge must be measured on rows the members "
            "do not train on (or set edge_split='' to measure it on the training rows)"
        )


def _member_method(build_only: bool, spec: dict, frozen_members, weights: np.ndarray, ctx: Context):
    """The Method that turns a distillation run into the training of member `spec`."""
    e, d = ctx.e, ctx.member.distill
    pair = weights.ndim == 2

    def build_model(config, info, seed, dtype, outputs):
        return mem.build_member(spec, info, seed=seed, dtype=dtype)

    if build_only:
        return Method(build_model=build_model)

    def forward(model, images, frozen, train):
        prev = None
        if frozen["members"] is not None:
            own, prev = frozen["members"].apply(images)
            base = jnp.sum(own, axis=0)
        if spec.get("connected"):
            f = model(images, train=train, prev=prev)
        else:
            f = model(images, train=train)
        if frozen["members"] is None:
            base = jnp.zeros_like(f)
        return base + f, {"base": base}

    def loss(logits, aux, teacher_logits, batch, frozen, step):
        w = frozen["weights"][batch["index"]]
        per = losses.weak_learner_loss(
            logits,
            aux["base"],
            teacher_logits,
            batch["label"],
            pair_weights=w if pair else None,
            example_weights=None if pair else w,
            gamma=e.gamma,
            barrier_weight=e.barrier_weight,
            barrier_t=e.barrier_t,
            kind=d.loss,
            alpha=d.alpha,
            temperature=d.temperature,
        )
        return per, (jnp.ones_like(per) if pair else w)

    return Method(
        frozen={"members": frozen_members, "weights": jnp.asarray(weights)},
        build_model=build_model,
        forward=forward,
        loss=loss,
        needs_index=True,
    )


def residual_loss(ensemble_logits, teacher_logits, labels, weights, ctx: Context) -> np.ndarray:
    """Per-example residual loss of F, as the member's loss counts it (pair weights inside)."""
    d = ctx.member.distill
    pw = jnp.asarray(weights) if weights.ndim == 2 else None
    return np.asarray(
        losses.boosting_residual_loss(
            jnp.asarray(ensemble_logits),
            jnp.asarray(teacher_logits),
            jnp.asarray(labels),
            pair_weights=pw,
            kind=d.loss,
            alpha=d.alpha,
            temperature=d.temperature,
        )
    )


def weighted_edge(before, after, weights) -> float:
    """Fraction of the weighted residual loss removed: 1 - sum w*l(F_w) / sum w*l(F_{w-1})."""
    w = weights if weights.ndim == 1 else np.ones(len(before), np.float32)
    return float(1.0 - np.sum(w * after) / max(float(np.sum(w * before)), 1e-12))


def ordered_candidates(ctx: Context) -> list:
    """FIND-WL's candidates, smallest first by XLA-measured FLOPs: [(name, entry, FLOPs per example)]
    (ConfigDict keys carry no order)."""
    sized = []
    for name, entry in ctx.e.candidates.items():
        model = mem.build_member(
            {"model": ens_config.model_only(entry), "connected": False}, ctx.info, seed=0, dtype=jnp.float32
        )
        sized.append((ctx.flops(model), name, entry))
    sized.sort(key=lambda t: (t[0], t[1]))
    return [(name, entry, float(flops)) for flops, name, entry in sized]


def run_bdistil(ctx: Context, variant: str, connect: bool) -> dict:
    """Rounds of the boosting game; returns the variant's state (members, log, stopped)."""
    e = ctx.e
    vdir = paths.join(ctx.workdir, variant)
    paths.makedirs(vdir)
    state_path = paths.join(vdir, "state.json")
    state = read_json(state_path, {"members": [], "log": [], "stopped": None})
    layer = e.connect.layer if connect else ""
    candidates = ordered_candidates(ctx)
    for w in range(len(state["members"]) + 1, e.rounds + 1):
        if state["stopped"]:
            break
        weights = {s: _round_weights(vdir, w, ctx.teacher_logits(s).shape, e.weights, s) for s in _game_splits(ctx)}
        state["log"] = [r for r in state["log"] if r["round"] != w]
        found = _find_weak_learner(ctx, variant, vdir, w, state, candidates, weights, layer)
        if found is None:
            write_json(state_path, state)
            return {"preempted": True}
        accepted, best, after_logits = found
        if accepted is None:
            state["stopped"] = (
                f"round {w}: no candidate met the weak-learning condition (best edge "
                f"{best[0]:.4f} by {best[1]} < gamma {e.gamma}); the ensemble keeps "
                f"{len(state['members'])} member(s)."
            )
            logging.info("[FIND-WL %s] stopped at %s", variant, state["stopped"])
            write_json(state_path, state)
            break
        state["members"].append(accepted)
        for s in weights:  # the weight player's next move, on every row of the game
            scores = wp.residual_scores(
                after_logits[s], ctx.teacher_logits(s), e.weights, ctx.member.distill.temperature
            )
            save_npy(
                paths.join(vdir, f"{_WEIGHT_FILES[s]}_round{w + 1}.npy"),
                wp.update_weights(weights[s], scores, eta=e.eta, mix=e.mix),
            )
        write_json(state_path, state)
    return state


# The weight player weighs the training rows and, when the edge is held out, the edge split's rows too.
_WEIGHT_FILES = {"train": "weights", "edge": "edge_weights"}


def _game_splits(ctx: Context) -> tuple[str, ...]:
    return ("train", "edge") if "edge" in ctx.sources else ("train",)


def _round_weights(vdir: str, w: int, shape: tuple[int, int], weights_cfg, split: str = "train") -> np.ndarray:
    """The weight player's weights for round `w` over `split`'s rows: saved by round w - 1, or the initial
    ones (saved in round 1)."""
    wpath = paths.join(vdir, f"{_WEIGHT_FILES[split]}_round{w}.npy")
    n, k = shape
    weights = load_npy(wpath) if paths.exists(wpath) else wp.initial_weights(n, k, weights_cfg)
    if w == 1:
        save_npy(wpath, weights)
    return weights


def save_npy(path: str, array: np.ndarray) -> None:
    """`np.save` to a local path or a URL (gs://...), written whole and atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    paths.write_bytes(path, buf.getvalue())


def load_npy(path: str) -> np.ndarray:
    """`np.load` of a .npy file at a local path or a URL."""
    return np.load(io.BytesIO(paths.resolve(path).read_bytes()))


def _frozen_members(ctx: Context, members: list, layer: str):
    """(frozen ensemble or None, width of its connection activation or 0) of the members accepted so far."""
    frozen, prev_dim = None, 0
    if members:
        frozen = mem.load_ensemble(members, ctx.info, layer=layer).frozen()
        if layer:
            prev_dim = mem.activation_dim(frozen, ctx.info.image_shape, ctx.info.modality)
    return frozen, prev_dim


def _find_weak_learner(
    ctx: Context, variant: str, vdir: str, w: int, state: dict, candidates: list, weights: dict, layer: str
):
    """FIND-WL for round `w`: trains the candidates, smallest first, until one meets the weak-learning condition
    on the edge rows (the edge split when there is one, else the training rows).

    Appends each candidate's entry to state["log"]. Returns (accepted spec or None, (best edge, its candidate),
    {split: the ensemble logits with the last candidate tried}), or None if a member run was preempted.
    """
    e = ctx.e
    frozen, prev_dim = _frozen_members(ctx, state["members"], layer)
    best, after_logits = None, None
    for j, (cname, cand, flops) in enumerate(candidates):
        spec = {
            "round": w,
            "candidate": cname,
            "model": ens_config.model_only(cand),
            "epochs": cand.get("epochs"),
            "connected": bool(layer and frozen),
            "prev_dim": prev_dim,
            "join": e.connect.join,
            "width": int(e.connect.width),
            "workdir": paths.join(vdir, f"round{w}", cname),
        }
        cfg = ctx.member_config(f"{variant}_r{w}_{cname}", cand, ctx.member.seed + 1000 * w + j)
        result = ensure_trained(cfg, spec["workdir"], method=_member_method(False, spec, frozen, weights["train"], ctx))
        if result.get("preempted"):
            return None
        edges, after_logits = _candidate_edges(ctx, state["members"] + [spec], layer, weights)
        edge = edges.get("edge", edges["train"])  # held out when there is an edge split
        entry = _find_wl_entry(w, cname, edge, e.gamma, result, rows=e.edge_split or "training rows")
        entry.update(edge_rows=e.edge_split or "training rows", train_edge=edges["train"], flops=flops)
        state["log"].append(entry)
        logging.info("[FIND-WL %s] round %d, candidate %s: %s", variant, w, cname, entry["reason"])
        best = max(best or (edge, cname), (edge, cname))
        if entry["accepted"]:
            return dict(spec, edge=edge), best, after_logits
    return None, best, after_logits


def _candidate_edges(ctx: Context, specs: list, layer: str, weights: dict) -> tuple[dict, dict]:
    """({split: weighted edge of the last member of `specs` over the ones before it}, {split: the ensemble's
    summed logits}) on every split of the game (the training rows, and the edge split's when there is one)."""
    frozen = mem.load_ensemble(specs, ctx.info, layer=layer).frozen()
    edges, after = {}, {}
    for split, w in weights.items():
        own, _ = mem.member_logits(frozen, ctx.sources[split], ctx.info, batch_size=ctx.bs, mesh=ctx.mesh)
        g, labels = ctx.teacher_logits(split), ctx.labels[split]
        after[split] = own.sum(axis=1)
        edges[split] = weighted_edge(
            residual_loss(own[:, :-1].sum(axis=1), g, labels, w, ctx),
            residual_loss(after[split], g, labels, w, ctx),
            w,
        )
    return edges, after


def _find_wl_entry(w: int, cname: str, edge: float, gamma, result: dict, rows: str = "training rows") -> dict:
    """The FIND-WL log entry of one candidate: its edge (measured on `rows`), whether it is accepted, and why."""
    meets = edge >= gamma
    return {
        "round": w,
        "candidate": cname,
        "edge": edge,
        "gamma": float(gamma),
        "accepted": meets,
        "reason": (
            f"edge {edge:.4f} on {rows} >= gamma {gamma}: weak-learning condition met"
            if meets
            else f"edge {edge:.4f} on {rows} < gamma {gamma}: condition not met, trying the next size"
        ),
        "test_accuracy": result.get("accuracy"),
    }


def run_resched(ctx: Context, sizes: list[dict]) -> dict:
    """Independently distilled members of the given sizes (plain KD from the teacher); `sizes`: the B-DISTIL
    members' specs, whose model and epochs each resched member takes."""
    vdir = paths.join(ctx.workdir, "resched")
    specs = []
    for i, size in enumerate(sizes, start=1):
        entry = ml_collections.ConfigDict(
            dict(size["model"], **({"epochs": size["epochs"]} if size.get("epochs") else {}))
        )
        spec = {
            "round": i,
            "candidate": f"member{i}",
            "model": ens_config.model_only(size["model"]),
            "epochs": size.get("epochs"),
            "connected": False,
            "workdir": paths.join(vdir, f"member{i}"),
        }
        cfg = ctx.member_config(f"resched_member{i}", entry, ctx.member.seed + 5000 + i)
        result = ensure_trained(cfg, spec["workdir"], method=_member_method(True, spec, None, np.zeros(0), ctx))
        if result.get("preempted"):
            return {"preempted": True}
        specs.append(spec)
    return {"members": specs, "log": [], "stopped": None}


def match_budgets(sized: list[tuple[float, str]], budgets: list[float]) -> list[str]:
    """For each FLOPs budget, the name of the (flops, name) entry closest to it in log ratio."""
    return [min(sized, key=lambda c: abs(np.log(c[0] / b)))[1] for b in budgets]


def run_no_resched(ctx: Context, budgets: list[float]) -> dict:
    """The no-resched curve: for each budget (the cumulative FLOPs of each B-DISTIL prefix), one student,
    the `ensemble.no_resched` entry whose measured FLOPs are closest; a model picked for several budgets
    is trained once."""
    entries = dict(ctx.e.no_resched.items())
    sized = []
    for name, entry in entries.items():
        model = mem.build_member(
            {"model": ens_config.model_only(entry), "connected": False}, ctx.info, seed=0, dtype=jnp.float32
        )
        sized.append((ctx.flops(model), name))
    picks = match_budgets(sized, budgets)
    specs = {}
    for name in dict.fromkeys(picks):
        spec = {
            "round": len(specs) + 1,
            "candidate": name,
            "model": ens_config.model_only(entries[name]),
            "epochs": entries[name].get("epochs"),
            "connected": False,
            "workdir": paths.join(ctx.workdir, "no_resched", name),
        }
        result = ensure_trained(
            ctx.member_config(f"no_resched_{name}", entries[name], ctx.member.seed + 9000),
            spec["workdir"],
            method=_member_method(True, spec, None, np.zeros(0), ctx),
        )
        if result.get("preempted"):
            return {"preempted": True}
        specs[name] = spec
    return {"members": list(specs.values()), "picks": picks, "budgets": [float(b) for b in budgets]}


def evaluate_no_resched(ctx: Context, state: dict) -> dict:
    """Each budget's single student alone: its test accuracy and its own FLOPs (a curve, one point per budget)."""
    specs = state["members"]
    ens = mem.load_ensemble(specs, ctx.info, layer="")
    own_test, labels = mem.member_logits(ens.frozen(), ctx.sources["test"], ctx.info, batch_size=ctx.bs, mesh=ctx.mesh)
    names = [s["candidate"] for s in specs]
    acc = {n: float(np.mean(np.argmax(own_test[:, i], -1) == labels)) for i, n in enumerate(names)}
    flops = {n: ctx.flops(m) for n, m in zip(names, ens.members)}
    return {
        "members": specs,
        "picks": state["picks"],
        "budget_flops": state["budgets"],
        "accuracy_by_members": [acc[n] for n in state["picks"]],
        "cumulative_flops": [flops[n] for n in state["picks"]],
        "log": [],
        "stopped": None,
    }


def resched_prefix(own_val, labels_val, own_test) -> tuple[np.ndarray, list[float]]:
    """Weighted averages of the first w members' log-probabilities, weights = validation accuracy."""
    acc = [float(np.mean(np.argmax(own_val[:, i], -1) == labels_val)) for i in range(own_val.shape[1])]
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(own_test), axis=-1))
    a = np.asarray(acc, np.float32)
    cum = np.cumsum(logp * a[None, :, None], axis=1) / np.cumsum(a)[None, :, None]
    return cum, acc


def evaluate_variant(ctx: Context, name: str, state: dict) -> dict:
    specs = state["members"]
    out = {"members": specs, "log": state.get("log", []), "stopped": state.get("stopped")}
    if not specs:
        return out
    layer = ctx.e.connect.layer if name == "bdistil" else ""
    ens = mem.load_ensemble(specs, ctx.info, layer=layer)
    own_test, labels = mem.member_logits(ens.frozen(), ctx.sources["test"], ctx.info, batch_size=ctx.bs, mesh=ctx.mesh)
    if name == "resched":
        own_val, labels_val = mem.member_logits(
            ens.frozen(), ctx.sources["val"], ctx.info, batch_size=ctx.bs, mesh=ctx.mesh
        )
        prefix, acc_w = resched_prefix(own_val, labels_val, own_test)
        # Independent members run separately: the cost of w of them is the sum of their own costs.
        own_flops = [ctx.flops(m) for m in ens.members]
        cum_flops = list(np.cumsum(own_flops).astype(float))
        out["average_weights"] = acc_w
    else:
        prefix = anytime.prefix_logits(own_test)
        cum_flops = mem.cumulative_flops(ens, ctx.info.image_shape, ctx.buckets())
    acc = [float(np.mean(np.argmax(prefix[:, w], -1) == labels)) for w in range(prefix.shape[1])]
    thresholds = np.concatenate([np.linspace(0.0, 1.0, ctx.e.num_thresholds), [1.01]])
    curves = {}
    for b in ctx.e.budgets:
        budget = b * cum_flops[-1]
        curves[f"budget_{b:g}"] = {
            k: v.tolist() for k, v in anytime.sweep_prefix(prefix, labels, cum_flops, thresholds, budget).items()
        }
    out.update({"accuracy_by_members": acc, "cumulative_flops": [float(f) for f in cum_flops], "anytime": curves})
    return out


def run_ensemble(config, workdir: str) -> dict:
    """Runs (or resumes) every variant of config.ensemble.variants and writes ensemble.json/.md."""
    ctx = Context(config, workdir)
    e = ctx.e
    variants = list(e.variants)
    states = {}
    for v in ("bdistil", "bdistil_noconn"):
        if v in variants:
            states[v] = run_bdistil(ctx, v, connect=(v == "bdistil" and bool(e.connect.layer)))
            if states[v].get("preempted"):
                return {"preempted": True, "variant": v}
    boosted = next((states[v] for v in ("bdistil", "bdistil_noconn") if v in states and states[v]["members"]), None)
    if "resched" in variants:
        if boosted is None:
            logging.warning("[resched] skipped: no B-DISTIL variant produced members to match in size")
        else:
            states["resched"] = run_resched(ctx, boosted["members"])
            if states["resched"].get("preempted"):
                return {"preempted": True, "variant": "resched"}
    evaluated = {v: evaluate_variant(ctx, v, s) for v, s in states.items()}
    if "no_resched" in variants:
        ref = next(
            (evaluated[v] for v in ("bdistil", "bdistil_noconn") if evaluated.get(v, {}).get("cumulative_flops")), None
        )
        if ref is None:
            logging.warning("[no_resched] skipped: no B-DISTIL ensemble to match in FLOPs")
        else:
            s = run_no_resched(ctx, ref["cumulative_flops"])
            if s.get("preempted"):
                return {"preempted": True, "variant": "no_resched"}
            evaluated["no_resched"] = evaluate_no_resched(ctx, s)
    g_test = ctx.teacher_logits("test")
    teacher = {
        "accuracy": float(np.mean(np.argmax(g_test, -1) == ctx.labels["test"])),
        "workdir": ctx.member.distill.teacher_workdir,
        "flops_per_example": ctx.flops(ctx.teacher.module()),
    }
    result = {
        "teacher": teacher,
        "variants": evaluated,
        "test_split": e.test_split,
        "connect_layer": e.connect.layer,
        # text: FLOPs are the mean over the test rows at these length buckets ({length: rows}); images: null
        "flops_buckets": None if ctx.buckets() is None else {str(b): n for b, n in ctx.buckets().items()},
        "num_test": len(ctx.labels["test"]),
        "seed": int(ctx.member.seed),
        "weights": e.weights,  # the game: "example" or "example_class"
        "gamma": float(e.gamma),
        "edge_split": e.edge_split,  # "" = the edge was measured on the members' training rows
        "config": config.to_dict(),
        **provenance(),  # revision, dirty, titans_version
    }
    if logs.is_writer():
        write_json(paths.join(ctx.workdir, "ensemble.json"), result)
        table = summary_table(result)
        runs.write_text(paths.join(ctx.workdir, "ensemble.md"), table + "\n")
        logging.info("B-DISTIL results:\n%s", table)
    return {"preempted": False, **result}


def summary_table(result: dict) -> str:
    t = result["teacher"]
    rows = [
        f"teacher: accuracy {t['accuracy']:.4f}, {t['flops_per_example'] / 1e6:.3f} MFLOPs/example",
        "",
        "| variant | members | accuracy | cumulative MFLOPs | fraction of teacher FLOPs |",
        "|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        for w, (a, f) in enumerate(zip(v.get("accuracy_by_members", []), v.get("cumulative_flops", [])), start=1):
            rows.append(f"| {name} | {w} | {a:.4f} | {f / 1e6:.3f} | {f / t['flops_per_example']:.3f} |")
        if v.get("stopped"):
            rows.append(f"| {name} | stopped | {v['stopped']} | | |")
    return "\n".join(rows)
