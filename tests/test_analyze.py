"""titans.analyze on digits runs made here: metrics equal a direct evaluation, comparisons equal numpy,
reports render in headless Chromium, checkpoints inspect without data, and bad inputs are named."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, digits_config

from titans import checkpoint as ckpt_lib
from titans import data, train
from titans import runs as runs_lib
from titans.analyze import (
    AnalysisError,
    analyze_path,
    analyze_run,
    compare_runs,
    diff_checkpoints,
    inspect_checkpoint,
    register_section,
)
from titans.analyze import sections as sections_lib


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Teachers at two learning rates x two seeds, and a student of the first."""
    root = tmp_path_factory.mktemp("analyze")
    out = {}
    for lr in (0.1, 0.3):
        for seed in (0, 1):
            w = str(root / f"teacher_lr{lr}_s{seed}")
            c = digits_config(data_dir, total_steps=40, seed=seed, **{"optimizer.learning_rate": lr})
            train.train_and_evaluate(c, w)
            out[(lr, seed)] = w
    s = digits_config(data_dir, total_steps=30)
    s.model.kwargs.hidden = (16,)
    s.distill.teacher_workdir = out[(0.1, 0)]
    out["student"] = str(root / "student")
    train.train_and_evaluate(s, out["student"])
    return out


def _np_ece(logits, labels, bins=15):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    conf, pred = p.max(-1), p.argmax(-1)
    idx = np.clip((conf * bins).astype(int), 0, bins - 1)
    return sum(abs((pred[idx == b] == labels[idx == b]).sum() - conf[idx == b].sum()) for b in range(bins)) / len(
        labels
    )


def test_analysis_equals_a_direct_evaluation(runs):
    w = runs["student"]
    m = analyze_run(w, hardest=8)
    model, cfg, info, _ = runs_lib.load_model(w)
    src = data.get_source(info.name, "test", data_dir=cfg.dataset.data_dir)
    logits, labels = runs_lib.predict_split(runs_lib.logits_fn, model, src, info, batch_size=64)
    teacher, _, _, _ = runs_lib.load_model(runs[(0.1, 0)])
    t_logits, _ = runs_lib.predict_split(runs_lib.logits_fn, teacher, src, info, batch_size=64)
    pred, t_pred = logits.argmax(-1), t_logits.argmax(-1)
    assert m["num_examples"] == len(labels) == 360
    assert m["accuracy"] == pytest.approx(np.mean(pred == labels), abs=1e-9)
    z = logits - logits.max(-1, keepdims=True)
    ce = -(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(-1)))
    assert m["loss"] == pytest.approx(ce.mean(), rel=1e-5)
    assert m["ece"] == pytest.approx(_np_ece(logits, labels), abs=1e-5)
    conf = np.zeros((10, 10), int)
    np.add.at(conf, (labels, pred), 1)
    np.testing.assert_array_equal(m["confusion"], conf)
    assert m["teacher"]["agreement"] == pytest.approx(np.mean(pred == t_pred))
    for c in range(10):
        assert m["teacher"]["agreement_by_class"][c] == pytest.approx(np.mean((pred == t_pred)[labels == c]))
    assert m["accuracy"] == pytest.approx(json.load(open(os.path.join(w, "results.json")))["accuracy"])
    rows = list(csv.DictReader(open(os.path.join(w, "analysis", "examples.csv"))))
    assert len(rows) == 360 and int(rows[5]["pred"]) == pred[5] and int(rows[5]["teacher_pred"]) == t_pred[5]
    assert sum(int(r["deferred_at_30pct"]) for r in rows) == pytest.approx(108, abs=3)
    for name in ("learning_curves", "reliability", "confusion", "per_class", "hardest"):
        assert os.path.getsize(os.path.join(w, "analysis", f"{name}.png")) > 2000
    assert os.path.getsize(os.path.join(w, "analysis", "report.html")) > 10000


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    w = runs[(0.3, 1)]
    analyze_run(w, hardest=8)
    url = "file://" + os.path.join(w, "analysis", "report.html")
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        base + ["--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert "<title>report-ok:5/5</title>" in dom  # the page loaded and all 5 embedded plots decoded
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--window-size=1200,1400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    import matplotlib.image

    img = matplotlib.image.imread(str(shot))
    assert img.shape[:2] == (1400, 1200)
    non_white = np.mean(img[..., :3].min(-1) < 0.9)
    assert non_white > 0.05, non_white  # plots, not an empty page
    colourful = np.mean(img[..., :3].max(-1) - img[..., :3].min(-1) > 0.2)
    assert colourful > 0.01, colourful  # the coloured bars and heat maps of the plots are on screen


def test_compare_groups_and_statistics_equal_numpy(runs, tmp_path):
    teachers = [runs[(lr, s)] for lr in (0.1, 0.3) for s in (0, 1)]
    res = compare_runs(teachers, str(tmp_path))
    assert res["differing"] == ["optimizer.learning_rate"]  # seeds pooled, paths ignored
    for lr in (0.1, 0.3):
        accs = [json.load(open(os.path.join(runs[(lr, s)], "results.json")))["accuracy"] for s in (0, 1)]
        row = next(r for r in res["groups"] if r["setting"] == f"optimizer.learning_rate={lr}")
        assert row["runs"] == 2
        assert row["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert row["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))
    for name in ("comparison.md", "runs.csv", "groups.csv", "curves.png"):
        assert os.path.getsize(tmp_path / name) > 50
    assert len(list(csv.reader(open(tmp_path / "runs.csv")))) == 5


def test_inspect_without_data_and_diff(runs, tmp_path):
    w = str(tmp_path / "copy")
    shutil.copytree(runs[(0.1, 0)], w)
    cfg = json.load(open(os.path.join(w, "config.json")))
    cfg["dataset"]["data_dir"] = str(tmp_path / "no_data_here")
    json.dump(cfg, open(os.path.join(w, "config.json"), "w"))
    info = inspect_checkpoint(w)
    assert info["steps"] == [20, 40] and info["step"] == 40
    model, _, _, _ = runs_lib.load_model(w)
    leaves = [np.asarray(x) for x in jax.tree.leaves(model.params)]
    assert info["param_count"] == sum(x.size for x in leaves) == sum(r["params"] for r in info["layers"])
    assert sorted(r["l2_norm"] for r in info["layers"]) == pytest.approx(sorted(np.linalg.norm(x) for x in leaves))
    assert info["flops_per_example"] > 0
    d = diff_checkpoints(w, 20, 40)
    assert d["total_diff_l2"] > 0 and all(r["relative"] >= 0 for r in d["layers"])
    assert diff_checkpoints(w, 40, 40)["total_diff_l2"] == 0.0
    assert diff_checkpoints(w, 40, -1, runs[(0.1, 1)])["total_diff_l2"] > 0  # another seed, same model
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="different models"):
        diff_checkpoints(w, 40, -1, runs["student"])


def test_bad_inputs_are_named(runs, tmp_path):
    with pytest.raises(AnalysisError, match="not a Titans run"):
        analyze_path(str(tmp_path))
    with pytest.raises(AnalysisError, match="splits are train, test"):
        analyze_run(runs[(0.3, 0)], split="validation")
    other = str(tmp_path / "other_model")
    shutil.copytree(runs[(0.3, 0)], other)
    cfg = json.load(open(os.path.join(other, "config.json")))
    cfg["model"]["kwargs"]["hidden"] = [32]
    json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError):
        analyze_run(other)
    proc = subprocess.run(
        [sys.executable, "-m", "titans.analyze", str(tmp_path / "nowhere")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode != 0 and "error:" in proc.stderr and "not a Titans run" in proc.stderr


def test_methods_plug_in_sections(runs):
    w = runs[(0.3, 0)]
    try:

        @register_section("test_method")
        def _section(workdir):
            return [{"title": "plugged-in numbers", "table": [["k", "v"], ["answer", "42"]]}] if workdir == w else None

        analyze_run(w, hardest=0)
    finally:
        sections_lib.SECTIONS.pop("test_method", None)
    page = open(os.path.join(w, "analysis", "report.html")).read()
    assert "plugged-in numbers" in page and "<td>42</td>" in page
