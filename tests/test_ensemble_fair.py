"""B-DISTIL measured fairly (issue 33): FIND-WL's edge on held-out rows, per-candidate epoch budgets, the
example-by-class game on the page, the no-resched claim as non-inferiority, and the raw outputs' provenance."""

import json
import os
import runpy
import shutil
import subprocess

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import REPO, digits_config

from titans import config as config_lib
from titans import data, experiment, losses, models, train
from titans.ensemble import config as ens_config
from titans.ensemble import members, report, runner, weights
from titans.provenance import provenance
from titans.stats import PairedDifference, non_inferiority_verdict, paired_difference

# --------------------------------------------------------------------------- non-inferiority


def test_non_inferiority_verdict_against_hand_computed_intervals():
    """d = (0.1, 0.3, 0.2): mean 0.2, sd 0.1, half-width t_{0.975,2} 0.1 / sqrt(3) = 4.3027 * 0.057735 = 0.24841,
    so [-0.0484, 0.4484]; d = (-1.1, -0.9, -1.0): [-1.2484, -0.7516]."""
    up = paired_difference([0.1, 0.3, 0.2], [0.0, 0.0, 0.0])
    assert (up.low, up.high) == pytest.approx((-0.04841, 0.44841), abs=1e-4)
    assert non_inferiority_verdict(up, 0.5) == "non-inferior"  # -0.048 > -0.5
    assert non_inferiority_verdict(up, 0.01) == "unresolved"  # -0.048 < -0.01 < 0.448
    down = paired_difference([-1.1, -0.9, -1.0], [0.0, 0.0, 0.0])
    assert non_inferiority_verdict(down, 0.5) == "inferior"  # the whole interval below -0.5
    assert non_inferiority_verdict(down, 1.0) == "unresolved"  # -1.248 < -1 < -0.752
    assert non_inferiority_verdict(down, 1.3) == "non-inferior"
    # The ends are strict: an interval ending exactly at -margin resolves nothing.
    assert non_inferiority_verdict(PairedDifference(-0.3, -0.5, -0.1, 3), 0.5) == "unresolved"
    assert non_inferiority_verdict(PairedDifference(-0.7, -0.9, -0.5, 3), 0.5) == "unresolved"
    assert non_inferiority_verdict(paired_difference([1.0], [0.0]), 0.5) == "unresolved"  # one pair
    with pytest.raises(ValueError, match="margin"):
        non_inferiority_verdict(up, -0.1)


def _run(seed, bdistil, no_resched, game="example", gamma=0.01):
    """An ensemble.json-like result: accuracies per member count of B-DISTIL and the no-resched curve."""
    flops = [1e5 * (w + 1) for w in range(len(bdistil))]
    log = [dict(round=1, candidate="tiny", edge=0.9, accepted=True, test_accuracy=bdistil[0])]
    return {
        "seed": seed,
        "weights": game,
        "gamma": gamma,
        "teacher": {"accuracy": 0.95, "flops_per_example": 1e7},
        "variants": {
            "bdistil": dict(accuracy_by_members=bdistil, cumulative_flops=flops, log=log, stopped=None),
            "no_resched": dict(accuracy_by_members=no_resched, cumulative_flops=flops, log=[], stopped=None),
        },
    }


def _claim_row(page: str, start: str) -> str:
    return next(line for line in page.splitlines() if line.startswith("| " + start))


def test_no_resched_claim_is_non_inferiority_within_the_declared_margin():
    """B-DISTIL - no-resched = (-0.1, -0.3, -0.2) points: not "better" (the interval spans zero) but
    non-inferior within 0.5 points, so the claim "competitive with no-resched" is reproduced; 1.0 point below
    with a tight interval is inferior, so not reproduced."""
    gap = (-0.001, -0.003, -0.002)
    runs = [_run(s, [0.80, 0.85], [0.80, 0.85 - g]) for s, g in enumerate(gap)]
    page = report.render(runs)
    assert f"Non-inferiority margin, declared for the no-resched claim: {report.NON_INFERIORITY_MARGIN:g}" in page
    row = _claim_row(page, "B-DISTIL is competitive with one student")
    assert "(w = 2, 3 seeds" in row and row.endswith("| reproduced |")
    assert "| 2 | -0.20 [-0.45, +0.05] | unresolved | non-inferior | 3 |" in page  # the paired table says both
    worse = [_run(s, [0.80, 0.85], [0.80, 0.86 + g]) for s, g in enumerate((0.0, 0.001, -0.001))]
    assert _claim_row(report.render(worse), "B-DISTIL is competitive").endswith("| not reproduced |")


def test_report_shows_the_example_class_game_next_to_the_example_game():
    example = [_run(s, [0.80, 0.82], [0.80, 0.82]) for s in range(3)]
    pairs = [_run(s, [0.80, 0.83 + 0.001 * s], [0.80, 0.82], game="example_class") for s in range(3)]
    page = report.render(example + pairs)
    assert "`weights=example`): 3 seed(s)" in page and "`weights=example_class`): 3 seed(s)" in page
    assert "## The example-by-class game" in page and "### Accuracy by members and FLOPs" in page
    claims = page.split("## Claims and verdicts", 1)[1].split("\n## ", 1)[0]
    assert claims.count("example_class weights") == 2  # its claims are tested too, and named as its own
    both = page.split("## The two games, B-DISTIL (connected), paired by seed", 1)[1]
    assert "| 2 | +1.10 [+0.85, +1.35] | better | 3 |" in both  # example-class - example, by seed
    alone = report.render(example)
    assert "`weights=example_class`): no raw outputs yet" in alone and "## The example-by-class game" not in alone
    with pytest.raises(ValueError, match="one study per gamma"):
        report.render(example + [_run(5, [0.8, 0.8], [0.8, 0.8], gamma=0.05)])


# ------------------------------------------------------------------------------ candidate entries


def test_candidate_epochs_are_checked_and_reach_the_member_run_config(data_dir):
    e = ens_config.defaults()
    e.member = digits_config(data_dir, **{"dataset.train_split": "train[:80%]"})
    e.member.distill.teacher_workdir = "/t"
    e.candidates = ml_collections.ConfigDict({"a": ens_config.model_entry("mlp", epochs=3, hidden=(8,))})
    e.no_resched = ml_collections.ConfigDict({"b": ens_config.model_entry("mlp", hidden=(8,))})
    cfg = ml_collections.ConfigDict(dict(stages=ml_collections.ConfigDict(), stage_order=(), ensemble=e))
    ens_config.validate(cfg)
    assert ens_config.model_only(e.candidates.a) == {"name": "mlp", "kwargs": {"hidden": (8,)}}
    e.candidates.a.epochs = 0.0
    with pytest.raises(config_lib.ConfigError, match="candidates.a.epochs"):
        ens_config.validate(cfg)
    e.candidates.a.epochs = 3.0
    e.candidates.a.steps = 3
    with pytest.raises(config_lib.ConfigError, match="unknown field"):
        ens_config.validate(cfg)
    del e.candidates.a["steps"]
    e.edge_split = "train[:80%]"
    with pytest.raises(config_lib.ConfigError, match="edge_split"):
        ens_config.validate(cfg)


# ---------------------------------------------------------------------------- the held-out edge


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fair_teacher"))
    train.train_and_evaluate(
        digits_config(data_dir, **{"dataset.train_split": "train[:90%]", "total_steps": 60}), workdir
    )
    return workdir


MEMORISER_EPOCHS = 86.0  # 14 rows of train[:1%], batch 8: 150 steps


def memoriser_config(data_dir, teacher, gamma):
    """A 256-wide MLP trained 150 steps on the 14 rows of train[:1%]: it memorises them (edge ~1 there) and
    generalises poorly; the edge split train[50%:90%] holds 575 rows it never trains on."""
    m = digits_config(
        data_dir,
        **{"dataset.train_split": "train[:1%]", "total_steps": 5, "batch_size": 8, "checkpoint.every_steps": 500},
    )
    m.distill.teacher_workdir = teacher
    e = ens_config.defaults()
    e.member = m  # 5 steps: without its own epoch budget the candidate would not memorise anything
    e.candidates = ml_collections.ConfigDict(
        {"big": ens_config.model_entry("mlp", epochs=MEMORISER_EPOCHS, hidden=(256,))}
    )
    e.rounds, e.gamma, e.variants = 1, gamma, ("bdistil",)
    e.edge_split = "train[50%:90%]"
    e.predict_batch_size, e.num_thresholds = 64, 5
    return ml_collections.ConfigDict(dict(stages=ml_collections.ConfigDict(), stage_order=(), ensemble=e))


@pytest.fixture(scope="module")
def memoriser_run(data_dir, teacher_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("memoriser"))
    experiment.run_experiment(memoriser_config(data_dir, teacher_dir, gamma=0.9), workdir)
    with open(os.path.join(workdir, "bdistil", "state.json")) as f:
        return workdir, json.load(f)


def test_find_wl_rejects_a_memoriser_whose_edge_holds_only_on_its_training_rows(memoriser_run, data_dir):
    """On its own 14 training rows the memoriser removes > 90% of the residual loss (so a decision on those
    rows would accept it at gamma 0.9); on the held-out edge split it removes far less, and FIND-WL follows
    the held-out edge: rejected, the ensemble stops with no member."""
    workdir, state = memoriser_run
    (entry,) = state["log"]
    assert entry["candidate"] == "big" and entry["edge_rows"] == "train[50%:90%]"
    assert entry["train_edge"] > 0.9 > entry["edge"]
    assert entry["accepted"] is False and state["members"] == [] and "round 1" in state["stopped"]
    assert "on train[50%:90%]" in entry["reason"]
    # The candidate's own epoch budget reached its run (the member config says 5 steps).
    with open(os.path.join(workdir, "bdistil", "round1", "big", "results.json")) as f:
        n = len(data.get_source("digits", "train[:1%]", data_dir=data_dir))
        assert json.load(f)["steps"] == round(MEMORISER_EPOCHS * n / 8) == 150


def test_accepted_round_moves_the_weight_player_on_the_edge_rows_and_records_provenance(
    memoriser_run, data_dir, teacher_dir
):
    """With gamma 0.3 the same (finished, read back) candidate is accepted on the held-out edge; the weight
    player's next weights over the edge rows are Hedge's step on the ensemble's residual there; ensemble.json
    holds the whole config and the code revision."""
    workdir, _ = memoriser_run
    os.remove(os.path.join(workdir, "bdistil", "state.json"))
    cfg = memoriser_config(data_dir, teacher_dir, gamma=0.3)
    out = experiment.run_experiment(cfg, workdir)
    v = out["ensemble"]["variants"]["bdistil"]
    assert [m["candidate"] for m in v["members"]] == ["big"] and v["members"][0]["epochs"] == MEMORISER_EPOCHS
    ens = members.load_ensemble(v["members"], data.dataset_info("digits"), layer="")
    src = data.get_source("digits", "train[50%:90%]", data_dir=data_dir)
    own, _ = members.member_logits(ens.frozen(), src, data.dataset_info("digits"), batch_size=64)
    g = np.load(os.path.join(workdir, "teacher_logits_edge.npy"))
    want = weights.update_weights(
        np.ones(len(src), np.float32), weights.residual_scores(own.sum(1), g, "example", 4.0), eta=1.0, mix=0.1
    )
    got = np.load(os.path.join(workdir, "bdistil", "edge_weights_round2.npy"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.load(os.path.join(workdir, "bdistil", "weights_round2.npy")).shape == (14,)
    with open(os.path.join(workdir, "ensemble.json")) as f:
        result = json.load(f)
    assert (
        result["config"]["ensemble"]["gamma"] == 0.3 and result["config"]["ensemble"]["edge_split"] == "train[50%:90%]"
    )
    assert result["weights"] == "example" and result["edge_split"] == "train[50%:90%]"
    assert result["revision"] == provenance()["revision"] and "titans_version" in result and "dirty" in result


def test_the_edge_on_the_edge_split_is_weighted_by_the_edge_rows_weights(memoriser_run, data_dir, teacher_dir):
    """runner._candidate_edges on the memoriser: each split's edge equals the hand computation with that
    split's weights (random ones here), and other weights give another edge."""
    workdir, _ = memoriser_run
    ctx = runner.Context(memoriser_config(data_dir, teacher_dir, gamma=0.9), workdir)
    spec = {"model": {"name": "mlp", "kwargs": {"hidden": (256,)}}, "connected": False}
    spec["workdir"] = os.path.join(workdir, "bdistil", "round1", "big")
    rng = np.random.default_rng(0)
    w = {s: rng.uniform(0.1, 3.0, len(ctx.sources[s])).astype(np.float32) for s in ("train", "edge")}
    edges, after = runner._candidate_edges(ctx, [spec], "", w)
    for s in ("edge", "train"):
        g, y = jnp.asarray(ctx.teacher_logits(s)), jnp.asarray(ctx.labels[s])
        before = np.asarray(losses.distillation_loss(jnp.zeros_like(g), g, y, kind="kd", alpha=0.9, temperature=4.0))
        now = np.asarray(losses.distillation_loss(jnp.asarray(after[s]), g, y, kind="kd", alpha=0.9, temperature=4.0))
        assert edges[s] == pytest.approx(1 - np.sum(w[s] * now) / np.sum(w[s] * before), rel=1e-4)
    flat, _ = runner._candidate_edges(ctx, [spec], "", {s: np.ones_like(x) for s, x in w.items()})
    assert abs(flat["edge"] - edges["edge"]) > 1e-3


def test_an_edge_split_sharing_rows_with_the_training_split_is_refused(data_dir, teacher_dir, tmp_path):
    cfg = memoriser_config(data_dir, teacher_dir, gamma=0.9)
    cfg.ensemble.edge_split = "train[:2%]"  # holds the 14 training rows of train[:1%]
    with pytest.raises(config_lib.ConfigError, match=r"edge_split='train\[:2%\]' shares 14 rows"):
        experiment.run_experiment(cfg, str(tmp_path))


# ------------------------------------------------------------------------- the strong-regime config


def test_strong_config_offers_candidates_up_to_the_teachers_cost_with_their_own_budgets():
    path = os.path.join(REPO, "configs", "bdistil_fmnist_strong.py")
    c = config_lib.load_config_file(path + ":seed=1")
    ens_config.validate(c)
    e = c.ensemble
    info = data.dataset_info("fashion_mnist")
    teacher_flops = 56.868e6  # the ResNet-20 of configs/fmnist_strong_teacher.py (resnet20, widths 16-32-64)
    for name, entry in e.candidates.items():
        assert entry.epochs > 0 and set(entry.kwargs) <= set(models.model_kwargs(entry.name)), name
    for name, entry in e.no_resched.items():
        assert entry.epochs > 0 and set(entry.kwargs) <= set(models.model_kwargs(entry.name)), name
    assert {"medium", "large", "resnet8"} <= set(e.candidates)
    widths = sorted(tuple(x.kwargs.widths) for x in e.candidates.values() if x.name == "resnet20")
    assert len(widths) >= 3 and widths[-1] == (16, 32, 64)  # the sweep reaches the teacher's own cost
    medium = members.build_member(
        {"model": ens_config.model_only(e.candidates.medium), "connected": False}, info, seed=0, dtype=jnp.float32
    )
    assert models.flops_per_example(medium, (28, 28, 1)) / teacher_flops == pytest.approx(0.038, abs=0.002)
    assert e.edge_split == "train[80%:90%]" and e.member.dataset.train_split == "train[:80%]"
    assert e.weights == "example"
    for gamma in runpy.run_path(path)["GAMMAS"]:
        g = config_lib.load_config_file(f"{path}:gamma={gamma},weights=example_class")
        ens_config.validate(g)
        assert g.ensemble.gamma == gamma and g.ensemble.weights == "example_class"


def test_provenance_names_the_checked_out_commit():
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    p = provenance()
    if head.returncode != 0 or shutil.which("git") is None:
        assert p["revision"] is None
    else:
        assert p["revision"] == head.stdout.strip() and isinstance(p["dirty"], bool)
    assert p["titans_version"]
