"""The cascade objectives at the strength the paper implies (docs/cascades.md): budget-sized easy subsets (their
size, their rows, each treatment, each hardness score), held-out deferral targets (cross-fitting on digits, the
refusal of in-sample teacher outputs), the post-hoc deferral estimator, and the fair-baseline recipe."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, digits_config

from titans import config as config_lib
from titans import data, losses, teachers, train
from titans.cascade import gates
from titans.teachers import crossfit


def _budget_config(**budget):
    c = config_lib.base_config()
    c.total_steps = 1
    c.distill.teacher_workdir = "teacher"
    c.distill.objective = "easy_budget"
    for k, v in budget.items():
        c.distill.budget[k] = v
    return c


# --- 1. Budget-sized easy subsets --------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.37])
def test_exactly_round_r_n_rows_are_the_teachers_and_they_are_the_top_r(rate):
    """budget_rows marks round(r * N) rows, the highest-scoring ones; EasyBudget.rows (teacher_loss) marks the rows
    with the largest teacher cross-entropy (numpy reference), the same count."""
    rng = np.random.default_rng(1)
    n = 203
    scores = rng.normal(size=n)
    hard = losses.budget_rows(scores, rate)
    k = round(rate * n)
    assert hard.sum() == k
    assert set(np.nonzero(hard)[0]) == set(np.argsort(scores)[::-1][:k])
    teacher = rng.normal(size=(n, 10)) * 3
    labels = rng.integers(0, 10, n)
    rows = losses.objective(_budget_config(rate=rate, score="teacher_loss")).rows(labels, teacher=teacher)["hard"]
    logp = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    t_loss = -logp[np.arange(n), labels]
    assert rows.sum() == k and set(np.nonzero(rows)[0]) == set(np.argsort(t_loss)[::-1][:k])


def _batch(seed=0, n=12, classes=10, extra=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(n, classes + extra)) * 2, jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(n, classes)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, n))
    hard = jnp.asarray((np.arange(n) % 3 == 0).astype(np.float32))
    return logits, teacher, labels, hard


def test_drop_weighs_exactly_the_hard_rows_zero():
    logits, teacher, labels, hard = _batch()
    loss, w = losses.budget_loss(logits, teacher, labels, hard, treatment="drop", alpha=0.9, temperature=4.0)
    np.testing.assert_array_equal(np.asarray(w), 1.0 - np.asarray(hard))
    np.testing.assert_allclose(loss, losses.distillation_loss(logits, teacher, labels, alpha=0.9, temperature=4.0))


def test_flatten_makes_the_hard_rows_targets_uniform_and_leaves_the_others():
    logits, teacher, labels, hard = _batch()
    loss, w = losses.budget_loss(logits, teacher, labels, hard, treatment="flatten", alpha=0.9, temperature=4.0)
    h = np.asarray(hard) > 0
    standard = np.asarray(losses.distillation_loss(logits, teacher, labels, alpha=0.9, temperature=4.0))
    np.testing.assert_allclose(np.asarray(loss)[~h], standard[~h], rtol=1e-5)
    # hard rows: 0.9 * T^2 * KL(uniform || softmax(s/T)), no label term (numpy reference)
    log_s = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64) / 4.0))
    uniform_kl = np.sum(0.1 * (np.log(0.1) - log_s), -1)
    np.testing.assert_allclose(np.asarray(loss)[h], (0.9 * 16 * uniform_kl)[h], rtol=1e-4)
    assert np.all(np.asarray(w) == 1.0)


def test_defer_gives_the_hard_rows_the_abstain_target():
    logits, teacher, labels, hard = _batch(extra=1)
    loss, _ = losses.budget_loss(logits, teacher, labels, hard, treatment="defer", alpha=0.9, temperature=4.0)
    h = np.asarray(hard) > 0
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    np.testing.assert_allclose(np.asarray(loss)[h], -logp[h, 10], rtol=1e-5)
    ce = -logp[np.arange(len(labels)), np.asarray(labels)]
    kd = np.asarray(losses.kd_divergence(logits[:, :10], teacher, 4.0))
    np.testing.assert_allclose(np.asarray(loss)[~h], (0.1 * ce + 0.9 * kd)[~h], rtol=1e-5)


def test_each_hardness_score_ranks_rows_as_defined():
    """Hand-made rows (label 0): teacher_loss ranks by the teacher's p(label) ascending; student_loss by the
    reference's; teacher_right_student_wrong puts the rows where the teacher is right and the student wrong
    first (the teacher's advantage ordering them), whatever their losses."""
    lab = np.zeros(4, int)
    p_t = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])  # teacher right on rows 0, 1, 3
    p_s = np.array([[0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.45, 0.55]])  # student wrong on rows 0, 2, 3
    t, s = np.log(p_t), np.log(p_s)
    assert list(np.argsort(-losses.hardness_scores("teacher_loss", lab, t))) == [2, 3, 1, 0]
    assert list(np.argsort(-losses.hardness_scores("student_loss", lab, reference_logits=s))) == [2, 0, 3, 1]
    both = losses.hardness_scores("teacher_right_student_wrong", lab, t, s)
    # rows 0 and 3 are teacher-right/student-wrong; row 0's advantage (log 0.9 - log 0.2) is the larger
    assert list(np.argsort(-both)[:2]) == [0, 3] and both[[0, 3]].min() > both[[1, 2]].max()


def test_budget_objective_is_validated():
    with pytest.raises(config_lib.ConfigError, match=r"distill.budget.rate"):
        config_lib.validate(_budget_config(rate=1.0))
    with pytest.raises(config_lib.ConfigError, match=r"distill.budget.score='loss'"):
        config_lib.validate(_budget_config(score="loss"))
    with pytest.raises(config_lib.ConfigError, match="reference_workdir"):
        config_lib.validate(_budget_config(score="student_loss"))
    config_lib.validate(_budget_config(score="student_loss", reference_workdir="ref", treatment="defer"))
    info = data.dataset_info("digits")
    from titans import runs

    assert runs.num_outputs(_budget_config(treatment="defer"), info) == 11
    assert runs.num_outputs(_budget_config(treatment="drop"), info) == 10


# --- 2. Held-out deferral targets: cross-fitting ------------------------------------------------------------


@pytest.fixture(scope="module")
def fold_teachers(data_dir, tmp_path_factory):
    """Two small digits teachers, one on each half of the training split."""
    dirs = []
    for k, split in enumerate(("train[:50%]", "train[50%:]")):
        workdir = str(tmp_path_factory.mktemp(f"fold{k}"))
        c = digits_config(data_dir, total_steps=30, seed=k, **{"dataset.train_split": split})
        c.model.kwargs.hidden = (16,)
        train.train_and_evaluate(c, workdir)
        dirs.append(workdir)
    return dirs


def _crossfit_student(data_dir, dirs, objective="defer", **overrides):
    c = digits_config(data_dir, total_steps=6, **overrides)
    c.distill.teacher_workdir = dirs[0]
    c.distill.crossfit_teachers = ",".join(dirs)
    c.distill.objective = objective
    c.dataset.augment = False
    return c


def test_each_rows_soft_label_comes_from_the_teacher_that_did_not_train_on_it(fold_teachers, data_dir):
    """K = 2: rows of the first half take the second-half teacher's logits and the reverse (a numpy comparison
    with each teacher's own predictions), through the trainer's soft-label source keyed by row index."""
    from titans import runs

    c = _crossfit_student(data_dir, fold_teachers)
    info = data.dataset_info("digits")
    src = data.get_source("digits", "train", data_dir=data_dir)
    n = len(src)
    images, _ = runs.split_arrays(src, info)
    own = [
        np.asarray(runs.predict(runs.logits_fn, runs.load_teacher(d, info)[0], images, batch_size=256))
        for d in fold_teachers
    ]
    logits, owner = crossfit.crossfit_logits(c, info, src)
    half = np.arange(n) < n // 2 + (n % 2)  # train[:50%] as TFDS rounds it
    half = np.isin(np.arange(n), crossfit.absolute_rows(info, "train[:50%]"))
    np.testing.assert_array_equal(owner, np.where(half, 1, 0))
    np.testing.assert_allclose(logits[half], own[1][half], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[~half], own[0][~half], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[half], own[0][half], atol=1e-3)  # the fold teachers differ there
    source = teachers.open_soft_labels(c, info, src)
    batch = {"index": np.array([0, n - 1, 5])}
    got = source.labeler.result(source.labeler.submit(batch))
    np.testing.assert_allclose(got, logits[[0, n - 1, 5]])


def test_a_row_no_teacher_left_out_is_refused():
    info = data.dataset_info("digits")
    with pytest.raises(config_lib.ConfigError, match="rows of the student's split 'train' were in the training split"):
        crossfit.assignment(info, "train", ["train[:60%]", "train[40%:]"], ["A", "B"])


def test_objectives_reading_teacher_correctness_refuse_in_sample_outputs(fold_teachers, data_dir):
    """A defer student (reads the teacher's correctness) of a teacher that trained on its rows is refused at
    resolve time with a clear error; the flag, cross-fitting, or an objective that does not read correctness run."""
    c = digits_config(data_dir, **{"dataset.train_split": "train[:50%]"})
    c.distill.teacher_workdir = fold_teachers[0]
    c.distill.objective = "defer"
    with pytest.raises(config_lib.ConfigError, match="allow_in_sample_teacher"):
        train.resolve(None, c)
    for objective, rule in (("easy_weighted", "correctness"), ("easy_weighted", "agreement"), ("defer_ms", "")):
        c.distill.objective = objective
        c.distill.easy.rule = rule or "confidence"
        with pytest.raises(config_lib.ConfigError, match="in-sample|trained on"):
            train.resolve(None, c)
    c.distill.easy.rule = "confidence"
    c.distill.objective = "easy_weighted"
    train.resolve(None, c)  # the teacher's confidence does not read the label
    c.distill.objective = "defer"
    c.distill.allow_in_sample_teacher = True
    train.resolve(None, c)
    c.distill.allow_in_sample_teacher = False
    c.dataset.train_split = "train[50%:]"  # the teacher never saw these rows
    train.resolve(None, c)


def test_budget_objective_ranks_the_held_out_outputs_and_trains(fold_teachers, data_dir, tmp_path):
    """easy_budget with the teacher-right-student-wrong score (a reference run) over cross-fitted teachers: its
    frozen mask has round(r N) rows, and a short run trains with it (the batch's rows read at their indices)."""
    ref = fold_teachers[1]
    c = _crossfit_student(data_dir, fold_teachers, objective="easy_budget")
    c.distill.budget.update(rate=0.2, score="teacher_right_student_wrong", treatment="defer", reference_workdir=ref)
    method = train.resolve(None, c)
    n = len(data.get_source("digits", "train", data_dir=data_dir))
    assert method.needs_index and method.frozen["hard"].sum() == round(0.2 * n)
    result = train.train_and_evaluate(c, str(tmp_path / "student"))
    assert result["objective"] == "easy_budget" and np.isfinite(result["loss"])


# --- 4. The post-hoc deferral estimator ----------------------------------------------------------------------


def test_posthoc_estimator_learns_a_planted_pattern():
    """Synthetic logits where the student is wrong on every row it predicts as class 3 (and the teacher always
    right): the fitted estimator scores those rows above the rest (AUROC near 1 on held-out rows). It is a
    registered fitted gate."""
    rng = np.random.default_rng(0)
    n, C = 2000, 5
    labels = rng.integers(0, C, n)
    pred = rng.integers(0, C, n)
    pred = np.where(pred == 3, 3, labels)  # the student is right unless it says 3
    labels[(pred == 3) & (labels == 3)] = 4  # so that a "3" is always wrong
    student = rng.normal(size=(n, C)) * 0.3
    student[np.arange(n), pred] += 3.0
    teacher = np.full((n, C), -2.0)
    teacher[np.arange(n), labels] = 2.0
    wrong = pred != labels
    score, flops, rest = gates.FITTED_GATES["posthoc_diff"](
        jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), labels
    )
    scores = np.asarray(jax.vmap(score)(jnp.asarray(student[rest], jnp.float32)))
    assert gates.auroc(scores, wrong[rest]) > 0.95 and flops > 0
    assert scores[wrong[rest]].mean() > scores[~wrong[rest]].mean() + 0.5


# --- 5. Fair baselines ----------------------------------------------------------------------------------------


def test_fair_recipe_gives_every_student_and_baseline_the_same_budget():
    """configs/titans_fmnist_strong_fair.py: every student stage (cascade students and equal-cost baselines) has
    the same epochs, augmentation and learning-rate grid, chosen on validation (`cascade.fair` in the helper)."""
    c = config_lib.load_config_file(
        os.path.join(REPO, "configs", "titans_fmnist_strong_fair.py") + ":teacher_dir=t,crossfit=a;b"
    )
    students = [n for n in c.stage_order if n != "teacher" and n in c.stages]
    recipes = {
        (c.stages[n].total_epochs, c.stages[n].dataset.augment, c.stages[n].optimizer.learning_rate) for n in students
    }
    assert len(students) > 4 and len({r[:2] for r in recipes}) == 1
    lrs = {r[2] for r in recipes}
    assert lrs == set(c.cascade.fair.learning_rates), lrs
    assert all(c.stages[n].dataset.eval_split == c.cascade.fair.select_split for n in students)
    assert c.cascade.fair.epochs == 30.0 and not c.cascade.fair.augment


def test_fair_recipe_overrides_each_students_own_budget():
    """Students that came with different durations, augmentation and learning rates all leave apply_recipe with
    the recipe's (the shipped config's students already agree, so that test alone would not see it)."""
    import ml_collections

    from titans.cascade import fair

    c = ml_collections.ConfigDict()
    c.stage_order = ("teacher", "a", "b")
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = config_lib.base_config()
    for name, epochs, lr in (("a", 3.0, 0.5), ("b", 7.0, 0.01)):
        st = config_lib.base_config()
        st.total_epochs, st.total_steps, st.optimizer.learning_rate = epochs, 0, lr
        c.stages[name] = st
    c.cascade = ml_collections.ConfigDict(dict(teacher="teacher", students=("a", "b"), baselines=()))
    out = fair.apply_recipe(c, epochs=12.0, augment=False, learning_rates=(0.1, 0.2), select_split="train[90%:]")
    students = [n for n in out.stage_order if n != "teacher"]
    assert len(students) == 4
    assert {(out.stages[n].total_epochs, out.stages[n].total_steps) for n in students} == {(12.0, 0)}
    assert {out.stages[n].optimizer.learning_rate for n in students} == {0.1, 0.2}


def test_the_page_keeps_each_students_rate_chosen_on_validation_not_on_test():
    """Seed 0's `a` is best on validation at lr1 and best on test at lr0: the page keeps lr1, under the name `a`,
    with lr1's stored logits; seed 1 chooses lr0. Runs without the grid pass unchanged."""
    from titans.cascade import report

    def run(val, test):
        students = {f"a_lr{i}": {"val_accuracy": v, "test_accuracy": t} for i, (v, t) in enumerate(zip(val, test))}
        config = {"cascade": {"fair": {"learning_rates": [0.1, 0.3]}}}
        return {"students": students, "baselines": [], "config": config}

    runs = [run([0.80, 0.85], [0.90, 0.70]), run([0.86, 0.85], [0.60, 0.99])]
    logits = [
        {"test/label": 0, "test/teacher": 1, "test/a_lr0": "seed0 lr0", "test/a_lr1": "seed0 lr1"},
        {"test/label": 0, "test/teacher": 1, "test/a_lr0": "seed1 lr0", "test/a_lr1": "seed1 lr1"},
    ]
    out, out_logits, choices = report.select_learning_rates(runs, logits)
    assert [r["students"]["a"]["test_accuracy"] for r in out] == [0.70, 0.60]
    assert [set(r["students"]) for r in out] == [{"a"}, {"a"}]
    assert out_logits[0] == {"test/label": 0, "test/teacher": 1, "test/a": "seed0 lr1"}
    assert out_logits[1]["test/a"] == "seed1 lr0"
    assert choices == {"a": [0.3, 0.1]}
    assert "| a | 0.3 | 0.1 |" in report.learning_rate_table(choices)
    plain = {"students": {"a": {}}, "baselines": []}
    assert report.select_learning_rates([plain])[0] == [plain]


# --- 6. The cascade page's statistics ---------------------------------------------------------------------------


def test_test_image_bootstrap_widens_the_seed_interval_by_the_test_sampling():
    """Per-image differences that vary widen the seeds' t-interval by 1.96 x the bootstrap sd of their mean
    (sqrt(p (1 - p) / N) for a ±1 difference on a fraction p of the rows), in quadrature; none that vary do not."""
    from titans.cascade import report
    from titans.stats import paired_difference

    d = paired_difference([0.51, 0.52, 0.53], [0.5, 0.5, 0.5])
    n = 4000
    rng = np.random.default_rng(0)
    diffs = [np.where(rng.random(n) < 0.1, rng.choice([-1.0, 1.0], n), 0.0) for _ in range(3)]
    wide = report.bootstrap_difference(d, diffs)
    same = report.bootstrap_difference(d, [np.full(n, 0.02)] * 3)
    assert same.low == pytest.approx(d.low) and same.high == pytest.approx(d.high)
    expected_sd = np.std(np.mean(diffs, 0)) / np.sqrt(n)
    want = np.hypot(d.high - d.mean, 1.96 * expected_sd)
    assert wide.high - wide.mean == pytest.approx(want, rel=0.1) and wide.high - wide.mean > d.high - d.mean


def test_oracle_gate_defers_exactly_the_rows_the_teacher_wins_at_the_cascades_rate():
    """A 10-row split: the student is wrong on 4 rows, the teacher right on 3 of those; at a test deferral rate
    of 0.2 the oracle gains 2 rows (0.6 + 0.2), at 0.5 all 3 (0.6 + 0.3)."""
    from titans.cascade import report

    y = np.zeros(10, int)
    student = np.tile([5.0, 0.0], (10, 1))
    student[:4] = [0.0, 5.0]  # wrong on rows 0-3
    teacher = np.tile([5.0, 0.0], (10, 1))
    teacher[0] = [0.0, 5.0]  # the teacher is wrong on row 0 too
    logits = {"test/label": y, "test/teacher": teacher, "test/s": student}

    def run(rate):
        curve = {"val_deferral_rate": [0.0, rate], "test_deferral_rate": [0.0, rate]}
        gate = {"gate_flops_per_example": 0.0, "curve": curve}
        return {
            "teacher": {"flops_per_example": 1.0},
            "students": {"s": {"flops_per_example": 0.0, "gates": {"g": gate}}},
        }

    assert report.oracle_accuracy(run(0.2), logits, "s", "g", 1.0) == pytest.approx(0.8)
    assert report.oracle_accuracy(run(0.5), logits, "s", "g", 1.0) == pytest.approx(0.9)


@pytest.mark.parametrize("page", ["titans_fmnist", "titans_fmnist_strong"])
def test_each_cascade_page_declares_exactly_one_primary_claim(page):
    with open(os.path.join(REPO, "docs", "results", f"{page}.md")) as f:
        text = f.read()
    assert text.count("| primary |") == 1 and text.count("| exploratory |") > 5
