"""The active-distillation loop: select -> buy teacher soft labels -> train the student -> evaluate.

Setting (docs/methods.md#robust-active-distillation): a small labelled set, a labelled validation split (only for estimating
the teacher's mistakes), a large unlabelled pool, and a teacher whose pool queries are counted
against a budget. `run(config, workdir)` runs every strategy of `config.active.strategies`, each in
WORKDIR/<strategy>/, round by round:

  round 0    the student trained on the labelled set alone (no queries);
  round r    the strategy picks b = budget_per_round pool points not bought yet, using the student
             of round r - 1; the teacher is run on exactly those points (CountingTeacher); a fresh
             student is trained on labels + all soft labels bought so far; it is evaluated on the
             test split.

The student is trained by the trainer's own step and `fit` loop under a Method (titans/active/student.py)
whose loss is cross-entropy on labelled rows and the distillation loss (student.distill.loss,
temperature) against the bought teacher logits on bought rows; its data is an in-memory subset. The pool's true labels are never used for training or
selection; they only give the diagnostic `teacher_error_bought` (how often the teacher was wrong on
what was bought).

Every round is checkpointed with orbax (`checkpoint.TreeCheckpoints`, WORKDIR/<strategy>/rounds/<r>: bought indices, bought
logits, query counters, history, the student's variables), so a rerun resumes after the last
finished round and never re-queries the teacher. Results: WORKDIR/active.json (per strategy the
history; the full resolved config; the git revision of the package, its dirty flag and the installed
version, from the call that wrote it) and active.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data as data_lib
from titans import figures, parallel, paths, provenance, runs, stats
from titans.active import config as active_config
from titans.active import selection
from titans.active import teachers as teachers_lib
from titans.active.student import StudentTrainer


class QueryBudgetError(RuntimeError):
    """A teacher query that the budget or the rules forbid (over budget, or a point bought twice)."""


class ResumeMismatchError(RuntimeError):
    """WORKDIR holds rounds of a run with a different config."""


class CountingTeacher:
    """The only way the loop reaches the teacher: counts every row the teacher is run on.

    `query_pool(indices)` buys soft labels for pool points (each at most once, at most `budget` in
    all); `query_validation(images)` runs the teacher on the labelled validation split (counted
    apart: it estimates the teacher's mistakes). `rows_run` counts every row ever passed to the
    teacher, so `rows_run == pool_queries + validation_queries` proves nothing else was run.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], pool_images: np.ndarray, budget: int):
        self._predict = predict
        self._pool_images = pool_images
        self.budget = int(budget)
        self.pool_queries = 0
        self.validation_queries = 0
        self.rows_run = 0
        self.bought: set[int] = set()

    def restore(self, bought, validation_queries: int) -> None:
        self.bought = {int(i) for i in bought}
        self.pool_queries = len(self.bought)
        self.validation_queries = int(validation_queries)

    def _run(self, images: np.ndarray) -> np.ndarray:
        self.rows_run += len(images)
        return np.asarray(self._predict(images), np.float32)

    def query_pool(self, indices) -> np.ndarray:
        indices = [int(i) for i in np.asarray(indices)]
        if len(set(indices)) != len(indices):
            raise QueryBudgetError("A selection named the same pool point twice.")
        again = self.bought.intersection(indices)
        if again:
            raise QueryBudgetError(f"Pool points {sorted(again)[:5]} were bought already.")
        if self.pool_queries + len(indices) > self.budget:
            raise QueryBudgetError(
                f"Buying {len(indices)} more labels would exceed the budget of {self.budget} "
                f"({self.pool_queries} spent)."
            )
        logits = self._run(self._pool_images[np.asarray(indices, np.int64)])
        self.bought.update(indices)
        self.pool_queries += len(indices)
        return logits

    def query_validation(self, images: np.ndarray) -> np.ndarray:
        self.validation_queries += len(images)
        return self._run(images)


@dataclasses.dataclass
class Data:
    info: data_lib.DatasetInfo
    labelled: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    pool_images: np.ndarray
    pool_labels: np.ndarray  # hidden: only for the teacher_error_bought diagnostic
    test_src: object


def load_data(config) -> Data:
    """Labelled, validation and pool points: a `seed` permutation of `dataset.split`, cut in three."""
    d, a = config.dataset, config.active
    info = data_lib.dataset_info(d.name)
    src = data_lib.load_in_memory(data_lib.get_source(d.name, d.split, data_dir=d.data_dir or None))
    n = len(src)
    need = a.num_labelled + a.num_validation + a.rounds * a.budget_per_round
    if n < need:
        raise config_lib.ConfigError(
            f"dataset.split {d.split!r} has {n} examples; labelled + validation + "
            f"rounds * budget_per_round needs at least {need}."
        )
    perm = np.random.default_rng([config.seed, 0xAC7]).permutation(n)
    lab, val = perm[: a.num_labelled], perm[a.num_labelled : a.num_labelled + a.num_validation]
    pool = perm[a.num_labelled + a.num_validation :]
    if a.pool_size:
        if a.pool_size > len(pool):
            raise config_lib.ConfigError(f"active.pool_size={a.pool_size} but only {len(pool)} points are left.")
        pool = pool[: a.pool_size]
    if len(pool) < a.rounds * a.budget_per_round:
        raise config_lib.ConfigError(f"The pool has {len(pool)} points, fewer than rounds * budget_per_round.")
    imgs, labels = src.images, np.asarray(src.labels, np.int32)
    test_src = data_lib.load_in_memory(data_lib.get_source(d.name, d.eval_split, data_dir=d.data_dir or None))
    return Data(info, (imgs[lab], labels[lab]), (imgs[val], labels[val]), imgs[pool], labels[pool], test_src)


def teacher_predict_fn(teacher: runs.FrozenModel, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """images -> the teacher's float32 logits, through `runs.predict`."""
    mesh = parallel.make_mesh()
    return lambda images: runs.predict(runs.logits_fn, teacher, images, batch_size=batch, mesh=mesh)


def _resume_fields(config) -> dict:
    """The config fields a strategy's rounds depend on, flat and JSON-normalised (tuples -> lists)."""
    flat = config_lib.flat_json(config)
    for k in ("active.strategies", "active.predict_batch_size"):
        flat.pop(k, None)
    return flat


def _check_resume(meta: dict, strategy: str, fields: dict, workdir: str) -> None:
    """Refuses a workdir of another strategy or of a config that differs in a field both define.

    Fields present on one side only (the shared run schema gained or lost a field since) do not
    change what was computed and are not compared.
    """
    if meta["strategy"] != strategy:
        raise ResumeMismatchError(f"{workdir} holds rounds of strategy {meta['strategy']!r}, not {strategy!r}.")
    old = meta["config"]
    diff = sorted(k for k in old.keys() & fields.keys() if old[k] != fields[k])
    if diff:
        shown = ", ".join(f"{k}: {old[k]!r} -> {fields[k]!r}" for k in diff[:5])
        raise ResumeMismatchError(
            f"{workdir} holds rounds of a run with another config ({shown}); use a fresh workdir."
        )


def _open_workdir(strategy: str, config, workdir: str) -> None:
    """Creates `workdir`, records which strategy and config its rounds belong to, or checks a resumed one."""
    paths.makedirs(workdir)
    meta_path = paths.join(workdir, "meta.json")
    fields = _resume_fields(config)
    meta = runs.read_json(meta_path)
    if meta is not None:
        _check_resume(meta, strategy, fields, workdir)
    else:
        runs.write_text(meta_path, json.dumps({"strategy": strategy, "config": fields}, indent=1))


def _fresh_state(config, data: Data, pure_params, pure_rest) -> dict:
    """The round state before round 0, sized for the whole budget; also the template checkpoints restore into."""
    rounds, cap, k = config.active.rounds, config.active.rounds * config.active.budget_per_round, data.info.num_classes
    nan = np.full(rounds + 1, np.nan, np.float32)
    return {
        "bought": np.full(cap, -1, np.int32),
        "soft": np.zeros((cap, k), np.float32),
        "num_bought": np.zeros((), np.int32),
        "validation_queries": np.zeros((), np.int32),
        "teacher_val_pred": np.full(len(data.validation[1]), -1, np.int32),
        "history": {
            "queries": np.zeros(rounds + 1, np.int32),
            "accuracy": nan.copy(),
            "loss": nan.copy(),
            "ece": nan.copy(),
            "teacher_error_bought": nan.copy(),
            "m": nan.copy(),
            "support": nan.copy(),
            "max_p": nan.copy(),
            "overlap_margin": nan.copy(),
            "select_time_s": nan.copy(),
            "train_time_s": nan.copy(),
            # Each round's student, right (1) or wrong (0) on each test row in split order: the page's intervals
            # resample the test rows (titans.stats.bootstrap_difference).
            "test_correct": np.zeros((rounds + 1, len(data.test_src)), np.uint8),
        },
        "student": ckpt_lib.to_savable({"params": pure_params, "rest": pure_rest}),
    }


def _resume(ckpt, state: dict, teacher: CountingTeacher, strategy: str, log) -> tuple[dict, int]:
    """Restores the last finished round, if any, into `state` and `teacher`; returns the state and the next round."""
    done = ckpt.latest()
    if done is None:
        return state, 0
    state = jax.tree.map(np.asarray, ckpt.restore(done, state))
    nb = int(state["num_bought"])
    teacher.restore(state["bought"][:nb], int(state["validation_queries"]))
    log(f"[{strategy}] resumed after round {done} ({nb} queries bought)")
    return state, done + 1


@dataclasses.dataclass
class _Rounds:
    """One strategy's rounds: the fixed inputs, the counted teacher, and the round state that is checkpointed.

    `abstract` is `trainer.abstract_variables()`: pure params and rest (the checkpoint layout) and the
    nnx params and rest that the student's variables are put back into.
    """

    strategy: str
    config: ml_collections.ConfigDict
    data: Data
    trainer: StudentTrainer
    teacher: CountingTeacher
    abstract: tuple
    state: dict

    def student_variables(self):
        """The previous round's student (as checkpointed in `state`) as nnx params and rest."""
        pure_params, pure_rest, params_like, rest_like = self.abstract
        p = jax.tree.map(lambda x: x, params_like)
        r = jax.tree.map(lambda x: x, rest_like)
        student = ckpt_lib.from_savable(self.state["student"], {"params": pure_params, "rest": pure_rest})
        nnx.replace_by_pure_dict(p, student["params"])
        nnx.replace_by_pure_dict(r, student["rest"])
        return p, r

    def estimate_mistakes(self, params, rest) -> float:
        """The robust strategy's m: how many of the b points to buy the teacher may get wrong.

        The validation split is run through the teacher once per strategy (its predictions are kept in `state`).
        """
        a, state = self.config.active, self.state
        if state["teacher_val_pred"][0] < 0:
            val_logits = self.teacher.query_validation(self.data.validation[0])
            state["teacher_val_pred"] = np.argmax(val_logits, -1).astype(np.int32)
            state["validation_queries"] = np.asarray(self.teacher.validation_queries, np.int32)
        val_gain = None
        if a.m_estimate == "informative":
            val_probs, _ = self.trainer.predict(params, rest, self.data.validation[0], a.predict_batch_size)
            val_gain = np.asarray(selection.informativeness(jnp.asarray(val_probs), a.informativeness))
        return selection.estimate_mistakes(
            state["teacher_val_pred"],
            self.data.validation[1],
            a.budget_per_round,
            student_gain=val_gain,
            kind=a.m_estimate,
            informative_fraction=a.informative_fraction,
        )

    def select(self, rnd: int) -> tuple[np.ndarray, float]:
        """Round `rnd`'s batch of pool points not bought yet, picked with the previous student, and m (0 unless robust).

        Records the time taken in the history's `select_time_s`.
        """
        a, data, state = self.config.active, self.data, self.state
        t0 = time.perf_counter()
        nb = int(state["num_bought"])
        params, rest = self.student_variables()
        probs, emb = self.trainer.predict(params, rest, data.pool_images, a.predict_batch_size)
        available = np.ones(len(data.pool_images), bool)
        available[state["bought"][:nb]] = False
        key = jax.random.fold_in(jax.random.key(self.config.seed), rnd)
        m = self.estimate_mistakes(params, rest) if self.strategy == "robust" else 0.0
        centres = None
        if self.strategy == "kcenter":
            _, lab_emb = self.trainer.predict(params, rest, data.labelled[0], a.predict_batch_size)
            centres = np.concatenate([lab_emb, emb[state["bought"][:nb]]])
        idx, extra = selection.select(
            self.strategy,
            key=key,
            probs=jnp.asarray(probs),
            available=jnp.asarray(available),
            b=a.budget_per_round,
            embeddings=jnp.asarray(emb),
            centres=centres,
            m=m,
            informativeness_kind=a.informativeness,
            kcenter_chunk=a.kcenter_chunk,
        )
        idx = np.asarray(jax.device_get(idx), np.int64)
        h = state["history"]
        h["select_time_s"][rnd] = time.perf_counter() - t0
        # Selection statistics: the m the game was played with, the support and largest inclusion
        # probability of its solution, and how much of the batch margin's top-b would have picked too.
        margin_idx, _ = selection.select(
            "margin", key=key, probs=jnp.asarray(probs), available=jnp.asarray(available), b=a.budget_per_round
        )
        h["overlap_margin"][rnd] = len(set(idx.tolist()) & set(np.asarray(margin_idx).tolist())) / len(idx)
        h["support"][rnd] = extra.get("support", np.nan)
        h["max_p"][rnd] = extra.get("max_p", np.nan)
        return idx, float(extra.get("m", m))

    def buy(self, rnd: int, idx: np.ndarray, m: float) -> None:
        """Buys the teacher's soft labels for `idx`; records them, m, and the teacher's error rate on all bought."""
        state, h, b = self.state, self.state["history"], self.config.active.budget_per_round
        nb = int(state["num_bought"])
        logits = self.teacher.query_pool(idx)
        state["bought"][nb : nb + b] = idx
        state["soft"][nb : nb + b] = logits
        nb += b
        state["num_bought"] = np.asarray(nb, np.int32)
        h["m"][rnd] = m
        bought = state["bought"][:nb]
        h["teacher_error_bought"][rnd] = float(
            np.mean(np.argmax(state["soft"][:nb], -1) != self.data.pool_labels[bought])
        )

    def train_and_evaluate(self, rnd: int) -> dict:
        """Trains a fresh student on the labelled set plus everything bought, tests it, and keeps it in `state`."""
        state, h, data = self.state, self.state["history"], self.data
        nb = int(state["num_bought"])
        lab_images, lab_labels = data.labelled
        n_lab, k = len(lab_labels), data.info.num_classes
        bought = state["bought"][:nb]
        soft = state["soft"][:nb]
        images = np.concatenate([lab_images, data.pool_images[bought]])
        # Bought rows carry the teacher's argmax as "label" (only the train metrics read it).
        labels = np.concatenate([lab_labels, np.argmax(soft, -1).astype(np.int32)])
        has_label = np.concatenate([np.ones(n_lab, bool), np.zeros(nb, bool)])
        soft_all = np.concatenate([np.zeros((n_lab, k), np.float32), soft])
        t0 = time.perf_counter()
        params, rest = self.trainer.train(images, labels, has_label, soft_all, seed=self.config.seed * 1000 + rnd)
        h["train_time_s"][rnd] = time.perf_counter() - t0
        ev = self.trainer.evaluate(params, rest, data.test_src)
        h["queries"][rnd], h["accuracy"][rnd], h["loss"][rnd], h["ece"][rnd] = nb, ev["accuracy"], ev["loss"], ev["ece"]
        probs, _ = self.trainer.predict(params, rest, data.test_src.images, self.trainer.cfg.eval_batch_size)
        h["test_correct"][rnd] = np.argmax(probs, -1) == np.asarray(data.test_src.labels)
        state["student"] = ckpt_lib.to_savable({"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)})
        return ev

    def round_message(self, rnd: int, ev: dict) -> str:
        """The log line for a finished round."""
        h = self.state["history"]
        extra = ""
        if self.strategy == "robust" and rnd:
            extra = (
                f", m={h['m'][rnd]:.1f}, support {h['support'][rnd]:.0f}, max p {h['max_p'][rnd]:.3f}, "
                f"{h['overlap_margin'][rnd]:.0%} shared with margin's top-b"
            )
        terr = f", teacher wrong on {h['teacher_error_bought'][rnd]:.1%} of bought" if rnd else ""
        nb = int(self.state["num_bought"])
        return f"[{self.strategy}] round {rnd}: {nb} queries, test accuracy {ev['accuracy']:.4f}{terr}{extra}"

    def history(self) -> dict:
        """The strategy's result: the per-round history as JSON values (None where a round has none), query counts."""
        h = self.state["history"]
        return {
            "queries": [int(q) for q in h["queries"]],
            "accuracy": [float(x) for x in h["accuracy"]],
            "loss": [float(x) for x in h["loss"]],
            "ece": [float(x) for x in h["ece"]],
            "teacher_error_bought": [None if np.isnan(x) else float(x) for x in h["teacher_error_bought"]],
            "m": [None if np.isnan(x) else float(x) for x in h["m"]],
            **{k: [None if np.isnan(x) else float(x) for x in h[k]] for k in ("support", "max_p", "overlap_margin")},
            "select_time_s": [None if np.isnan(x) else float(x) for x in h["select_time_s"]],
            "train_time_s": [float(x) for x in h["train_time_s"]],
            "test_correct": [
                None if np.isnan(a) else stats.pack_bits(c) for a, c in zip(h["accuracy"], h["test_correct"])
            ],
            "pool_queries": self.teacher.pool_queries,
            "validation_queries": self.teacher.validation_queries,
            "teacher_rows_run_this_call": self.teacher.rows_run,
        }


def run_strategy(
    strategy: str,
    config,
    data: Data,
    teacher_predict,
    trainer: StudentTrainer,
    workdir: str,
    *,
    stop_after_round: int | None = None,
    log: Callable[[str], None] = logging.info,
) -> dict:
    """Runs (or resumes) one strategy's rounds in `workdir`; returns its history.

    `stop_after_round` ends the call after that round is checkpointed (for tests of resuming).
    """
    rounds = config.active.rounds
    _open_workdir(strategy, config, workdir)
    abstract = trainer.abstract_variables()
    state = _fresh_state(config, data, *abstract[:2])
    ckpt = ckpt_lib.TreeCheckpoints(paths.join(workdir, "rounds"))
    teacher = CountingTeacher(teacher_predict, data.pool_images, budget=rounds * config.active.budget_per_round)
    state, start = _resume(ckpt, state, teacher, strategy, log)
    run = _Rounds(strategy, config, data, trainer, teacher, abstract, state)
    for rnd in range(start, rounds + 1):
        if rnd > 0:
            run.buy(rnd, *run.select(rnd))
        ev = run.train_and_evaluate(rnd)
        ckpt.save(rnd, run.state)
        log(run.round_message(rnd, ev))
        if stop_after_round is not None and rnd >= stop_after_round and rnd < rounds:
            ckpt.close()
            return {"stopped_after_round": rnd}
    ckpt.close()
    return run.history()


def _resolve_teacher(config, workdir: str, log) -> tuple[str, dict]:
    t = config.teacher
    tdir = paths.text(t.workdir.replace("{workdir}", workdir))
    ready = runs.RunDir(tdir).finished
    if not ready:
        if not len(t.train):
            raise FileNotFoundError(
                f"teacher.workdir={tdir!r} holds no finished Titans run and teacher.train is "
                f"empty: train the teacher first, or set teacher.train."
            )
        classes = active_config.noise_classes(config)
        log(f"[teacher] training in {tdir} (label noise {t.label_noise}, classes {list(classes) or 'all'})")
        teachers_lib.train_teacher(t.train, tdir, label_noise=t.label_noise, noise_classes=classes)
    res = runs.RunDir(tdir).results()
    # The teacher run's own evaluation, named by its split (a teacher evaluated on `validation` has no test
    # accuracy in its results: `test_accuracy` stays None unless that split is this run's test split).
    acc, split = res.get("accuracy"), res.get("split")
    test = acc if split == config.dataset.eval_split else None
    return tdir, {
        **_teacher_info(config),
        "workdir": tdir,
        "accuracy": acc,
        "accuracy_split": split,
        "test_accuracy": test,
    }


def _teacher_info(config) -> dict:
    t = config.teacher
    return {
        "workdir": None,
        "accuracy": None,
        "accuracy_split": None,
        "test_accuracy": None,
        "label_noise": float(t.label_noise),
        "noise_classes": list(active_config.noise_classes(config)),
    }


def run_active(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    log: Callable[[str], None] = logging.info,
    teacher_predict: Callable | None = None,
) -> dict:
    """Runs every strategy (resuming finished rounds); writes WORKDIR/active.json and active.png.

    `teacher_predict` (images -> logits) replaces the teacher run (tests).
    """
    config = active_config.validate(config)
    workdir = paths.text(workdir)  # a local path made absolute; a URL (gs://...) kept as it is
    paths.makedirs(workdir)
    runs.write_text(paths.join(workdir, "config.json"), config_lib.to_json(config))
    data = load_data(config)
    teacher_info = _teacher_info(config)
    if teacher_predict is None:
        tdir, teacher_info = _resolve_teacher(config, workdir, log)
        teacher, _ = runs.load_teacher(tdir, data.info)
        teacher_predict = teacher_predict_fn(teacher, config.active.predict_batch_size)
    cap = len(data.labelled[1]) + config.active.rounds * config.active.budget_per_round
    trainer = StudentTrainer(config.student, data.info, cap)
    results = {}
    for s in active_config.strategies(config):
        results[s] = run_strategy(s, config, data, teacher_predict, trainer, paths.join(workdir, s), log=log)
    out = {
        "name": config.name,
        "seed": int(config.seed),
        "dataset": config.dataset.name,
        "num_labelled": int(config.active.num_labelled),
        "num_validation": int(config.active.num_validation),
        "pool_size": int(len(data.pool_images)),
        "test_rows": int(len(data.test_src)),
        "budget_per_round": int(config.active.budget_per_round),
        "rounds": int(config.active.rounds),
        "teacher": teacher_info,
        "strategies": results,
        "config": json.loads(config_lib.to_json(config)),  # the full resolved config
        **provenance.provenance(),  # revision, dirty, titans_version of the call that wrote this file
    }
    runs.write_json(paths.join(workdir, "active.json"), out)
    plot(out, paths.join(workdir, "active.png"))
    return out


def plot(result: dict, path: str) -> None:
    fig, ax = figures.subplots(figsize=(6, 4))
    for name, r in result["strategies"].items():
        ax.plot(r["queries"], r["accuracy"], marker="o", label=name)
    t = result.get("teacher") or {}
    if t.get("test_accuracy"):
        ax.axhline(t["test_accuracy"], color="gray", ls="--", lw=1, label="teacher")
    ax.set_xlabel("teacher queries (pool points bought)")
    ax.set_ylabel("student test accuracy")
    ax.set_title(f"{result['name']} (seed {result['seed']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    figures.save_png(fig, path, dpi=120)
