"""docs/results is recomputable: its pages equal what `titans-results rebuild` makes from results/, the raw
outputs reproduce the curves they summarise, and the statistics behind every verdict are right."""

import functools
import glob
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
from helpers import REPO

from titans.results import logits, studies
from titans.stats import claim_verdict, mean_sd, not_worse_verdict, paired_difference, time_ratio


def test_committed_result_pages_equal_the_regenerated_ones():
    """Every study with raw outputs in results/ regenerates to its committed docs/results page."""
    present = [n for n, s in studies.STUDIES.items() if os.path.isdir(s.raw_dir(REPO))]
    assert "titans_fmnist" in present  # the cascade study's raw outputs are part of the repo
    assert studies.rebuild(REPO, check=True) == [], "run `titans-results rebuild` and commit docs/results"


def test_rebuild_check_notices_a_changed_raw_output(tmp_path):
    """The check is not vacuous: change one accuracy in a copied cascade.json and the page is stale."""
    root = str(tmp_path)
    shutil.copytree(os.path.join(REPO, "results", "titans_fmnist"), os.path.join(root, "results", "titans_fmnist"))
    os.makedirs(os.path.join(root, "docs", "results"))
    shutil.copy(studies.STUDIES["titans_fmnist"].doc_path(REPO), os.path.join(root, "docs", "results"))
    assert studies.rebuild(root, check=True, only=("titans_fmnist",)) == []
    path = os.path.join(root, "results", "titans_fmnist", "seed0", "cascade.json")
    with open(path) as f:
        data = json.load(f)
    data["teacher"]["test_accuracy"] -= 0.01
    with open(path, "w") as f:
        json.dump(data, f)
    assert studies.rebuild(root, check=True, only=("titans_fmnist",)) == [
        studies.STUDIES["titans_fmnist"].doc_path(root)
    ]


def _msp_score(logits):
    """The msp gate's deferral score written out in numpy: 1 - max softmax (defer when it is high)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    return 1.0 - (p / p.sum(-1, keepdims=True)).max(-1)


_CASCADE_RUNS = sorted(
    os.path.relpath(os.path.dirname(p), os.path.join(REPO, "results"))
    for study in ("titans_fmnist", "titans_fmnist_strong")
    for p in glob.glob(os.path.join(REPO, "results", study, "seed*", "cascade.json"))
)


def test_every_cascade_study_has_three_seeds():
    assert [f"{s}/seed{i}" for s in ("titans_fmnist", "titans_fmnist_strong") for i in range(3)] == _CASCADE_RUNS


@pytest.mark.parametrize("run_dir", _CASCADE_RUNS)
def test_cascade_curves_are_recomputed_from_the_committed_logits(run_dir):
    """From cascade_logits.npz alone (numpy, not the library's sweep): each stage's test accuracy, and the
    msp gate's test accuracy at every swept validation deferral rate, match cascade.json. The committed
    logits are 8-bit (titans/results/logits.py): argmaxes are the run's own, and the rounding moves only
    the odd example at a threshold (rows whose scores tie once rounded)."""
    run = os.path.join(REPO, "results", run_dir)
    with open(os.path.join(run, "cascade.json")) as f:
        result = json.load(f)
    raw = logits.load(os.path.join(run, "cascade_logits.npz"))
    y_test, t_test = raw["test/label"], raw["test/teacher"]
    C = t_test.shape[-1]
    # The run's float16 logits can tie two top classes (spacing 0.016 at |logit| 16): a handful of argmaxes
    # differ from cascade.json's float32 ones (the 8-bit codes keep the float16 argmax exactly).
    assert np.mean(t_test.argmax(-1) == y_test) == pytest.approx(result["teacher"]["test_accuracy"], abs=1e-3)
    for name, entry in result["students"].items():
        s_val, s_test = raw[f"val/{name}"][:, :C], raw[f"test/{name}"][:, :C]
        assert np.mean(s_test.argmax(-1) == y_test) == pytest.approx(entry["test_accuracy"], abs=1e-3)
        curve = entry["gates"]["msp"]["curve"]  # msp reads the C class outputs (of a defer student too)
        v, x = _msp_score(s_val), _msp_score(s_test)
        worst = 0.0
        for rate, acc in zip(curve["val_deferral_rate"], curve["test_accuracy"]):
            k = int(round(rate * len(v)))  # defer the k highest validation scores
            thr = np.inf if k == 0 else (-np.inf if k == len(v) else np.sort(v)[::-1][k - 1 : k + 1].mean())
            answer = np.where(x > thr, t_test.argmax(-1), s_test.argmax(-1))
            worst = max(worst, abs(float(np.mean(answer == y_test)) - acc))
        assert worst <= 2e-3, (name, worst)  # measured: at most 13 of 10,000 test images (float16: 7)


def test_logits_codec_keeps_the_argmax_and_rounds_within_half_a_step(tmp_path):
    """8-bit logits (titans/results/logits.py): a logit within 255 steps of its row's top decodes to within
    half a step (two where raised), one further below to top - 255 steps; the top decodes exactly, and the
    codes keep the order of the two largest logits against the rest, so a near-tie (0.012 below, at an
    earlier index) keeps the argmax of a row and of a row without its top (a defer student). Labels are kept,
    the teacher's threshold-split logits dropped; a run's own float16 file is read as it is."""
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 8.0, (400, 11)).astype(np.float16)
    z[:3] = -3.0
    z[0, :3] = [4.99, 5.0, -50.0]  # a near-tie before the top, and a logit 55 below it
    z[1, :3] = [7.0, 7.0, 1.0]  # an exact tie: the first index, as numpy's argmax
    z[2, [3, 4, 10]] = [2.0, 2.01, 9.0]  # a defer student's row: a near-tie among the classes below the top
    arrays = {"val/label": np.arange(400) % 10, "val/teacher": z, "test/stage": z}
    path = str(tmp_path / "cascade_logits.npz")
    logits.save(path, arrays)
    with np.load(path) as stored:
        assert stored["test/stage.q8"].dtype == np.uint8 and "val/teacher.q8" not in stored.files
    got = logits.load(path)
    assert sorted(got) == ["test/stage", "val/label"] and np.array_equal(got["val/label"], arrays["val/label"])
    dec, ref = got["test/stage"], z.astype(np.float32)
    assert np.array_equal(dec.argmax(-1), ref.argmax(-1)) and dec[0].argmax() == 1 and dec[1].argmax() == 0
    assert np.array_equal(dec[:, :-1].argmax(-1), ref[:, :-1].argmax(-1)) and dec[2, :-1].argmax() == 4
    assert np.array_equal(dec.max(-1), ref.max(-1))
    near = ref.max(-1, keepdims=True) - ref <= 255 * logits.STEP
    err = np.abs(dec - ref)[near]
    assert err.max() <= 2 * logits.STEP and np.mean(err <= logits.STEP / 2 + 1e-3) > 0.99  # raised: a few
    assert dec[0, 2] == 5.0 - 255 * logits.STEP
    np.savez(tmp_path / "own.npz", **{"test/stage": z})  # a run's own file: no format marker
    assert np.array_equal(logits.load(str(tmp_path / "own.npz"))["test/stage"], z)
    np.savez(tmp_path / "bad.npz", format=np.array("q4"), step=np.float32(1))
    with pytest.raises(ValueError, match=r"bad\.npz: unknown logits format 'q4'"):
        logits.load(str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("run_dir", _CASCADE_RUNS)
def test_committed_cascade_logits_are_8_bit(run_dir):
    with np.load(os.path.join(REPO, "results", run_dir, "cascade_logits.npz")) as stored:
        assert str(stored["format"]) == logits.FORMAT
        floats = [k for k in stored.files if stored[k].dtype.kind == "f" and not k.endswith(".top")]
        assert floats == ["step"], floats


def test_collect_stores_a_runs_logits_in_8_bits(tmp_path):
    """`titans-results collect` re-encodes a run's float16 cascade_logits.npz; the stored file decodes back."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "cascade.json").write_text(json.dumps({"students": {}}))
    z = np.random.default_rng(1).normal(0.0, 5.0, (50, 10)).astype(np.float16)
    np.savez_compressed(run / "cascade_logits.npz", **{"val/label": np.zeros(50, np.int16), "test/s": z})
    written = studies.collect(studies.STUDIES["titans_fmnist"], str(run), "seed0", root=str(tmp_path / "repo"))
    (out,) = [w for w in written if w.endswith(".npz")]
    with np.load(out) as stored:
        assert stored["test/s.q8"].dtype == np.uint8 and str(stored["format"]) == logits.FORMAT
    assert np.abs(logits.load(out)["test/s"] - z.astype(np.float32)).max() <= logits.STEP / 2 + 1e-3


# CONTRIBUTING.md, "Binaries": every tracked file with a NUL byte counts.
BINARY_BUDGET_MB = 25


def _git_ls_files() -> list[str]:
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(REPO):
        pytest.skip("not a git checkout of the repository (an sdist or a copy)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [os.fsdecode(name) for name in out.split(b"\0") if name]


def test_tracked_binaries_stay_within_the_budget_and_no_checkpoint_is_tracked():
    """The sum of every tracked binary (a file holding a NUL byte, measured as it is in the working tree) is
    within the budget that CONTRIBUTING.md states, and nothing under a `checkpoints/` directory is tracked
    (a trained model is regenerated by its config's command, not committed)."""
    with open(os.path.join(REPO, "CONTRIBUTING.md")) as f:
        assert f"**Budget: {BINARY_BUDGET_MB} MB**" in f.read(), "CONTRIBUTING.md states another budget"
    tracked = _git_ls_files()
    in_checkpoints = [p for p in tracked if "checkpoints" in p.split("/")[:-1]]
    assert not in_checkpoints, f"checkpoints are tracked: {in_checkpoints[:5]}"
    sizes = {}
    for name in tracked:
        path = os.path.join(REPO, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                data = f.read()
            if b"\0" in data:
                sizes[name] = len(data)
    total = sum(sizes.values())
    largest = sorted(sizes, key=sizes.get, reverse=True)[:5]
    assert total <= BINARY_BUDGET_MB * 10**6, (
        f"tracked binaries: {total / 1e6:.2f} MB over the {BINARY_BUDGET_MB} MB budget; largest: "
        + ", ".join(f"{n} ({sizes[n] / 1e6:.2f} MB)" for n in largest)
    )


def test_time_ratio_against_hand_computed_intervals():
    """time_a / time_b over paired repeats: the t-interval of the log ratios, mapped back. For ratios 1.1, 1.0,
    0.9: logs 0.09531, 0, -0.10536; mean -0.003351, sd 0.10034, t(0.975, 2) = 4.3027, half-width 0.24926,
    so geomean 0.99666 in [0.77670, 1.27890]. The times' scale cancels."""
    r = time_ratio([1.1 * 3, 1.0 * 5, 0.9 * 7], [3.0, 5.0, 7.0], target=0.8)
    assert (r.geomean, r.low, r.high, r.n) == pytest.approx((0.99666, 0.77670, 1.27890, 3), abs=1e-4)
    assert r.verdict == "unresolved"  # 0.8 lies inside the interval
    assert time_ratio([1.1, 1.0, 0.9], [1.0] * 3, target=0.75).verdict == "met"
    assert time_ratio([1.1, 1.0, 0.9], [1.0] * 3, target=1.3).verdict == "not met"
    assert time_ratio([2.0, 2.0], [1.0, 1.0], target=2.0).verdict == "met"  # no spread: the interval is 2.0
    assert time_ratio([1.1], [1.0], target=0.5).verdict == "unresolved"  # one repeat resolves nothing
    assert time_ratio([1.1, 1.0], [1.0, 1.0]).verdict == "unresolved"  # no target
    # Which side is faster: the whole interval of time_a / time_b below 1, above 1, or spanning it.
    assert time_ratio([0.5, 0.5], [1.0, 1.0]).faster("A", "B") == "A faster"
    assert time_ratio([2.0, 2.0], [1.0, 1.0]).faster("A", "B") == "B faster"
    assert r.faster("A", "B") == "unresolved" and time_ratio([0.5], [1.0]).faster("A", "B") == "unresolved"


def test_paired_difference_against_hand_computed_intervals():
    # d = (1, 2, 3): mean 2, sd 1, t(0.975, 2) = 4.3027 -> half-width 2.4842.
    d = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert (d.mean, d.low, d.high, d.n) == pytest.approx((2.0, 2.0 - 2.48414, 2.0 + 2.48414, 3), abs=1e-4)
    assert d.verdict == "unresolved" and claim_verdict(d) == "unresolved"
    tight = paired_difference([1.1, 1.0, 0.9], [0.0, 0.0, 0.0])  # sd 0.1 -> [0.752, 1.248]
    assert tight.verdict == "better" and claim_verdict(tight) == "reproduced"
    assert paired_difference([0.0, 0.0, 0.0], [1.1, 1.0, 0.9]).verdict == "worse"
    # Pairs with a missing side are dropped, not imputed; one pair cannot resolve anything.
    one = paired_difference([1.0, None, float("nan")], [0.0, 1.0, 2.0])
    assert one.n == 1 and one.verdict == "unresolved" and one.format() == "+1.0000 (1 seed)"
    assert paired_difference([None], [1.0]).format() == "n/a"
    assert mean_sd([1.0, 2.0, 3.0], "{:.1f}") == "2.0 ± 1.0"
    assert mean_sd([1.0, None, 3.0], "{:.1f}") == "2.0 ± 1.4 (2/3 seeds)"


def test_not_worse_verdict_uses_the_declared_margin():
    d = paired_difference([-0.001, 0.0, 0.001], [0.0, 0.0, 0.0])  # interval about [-0.0025, 0.0025]
    assert not_worse_verdict(d, 0.005) == "reproduced" and not_worse_verdict(d, 0.001) == "unresolved"
    far = paired_difference([-0.011, -0.010, -0.009], [0.0, 0.0, 0.0])
    assert not_worse_verdict(far, 0.005) == "not reproduced"
    assert math.isnan(paired_difference([], []).mean)


def test_collect_refuses_an_unfinished_run_and_a_path_outside_the_study(tmp_path):
    study = studies.STUDIES["bdistil_fmnist"]
    with pytest.raises(studies.CollectError, match="ensemble.json"):
        studies.collect(study, str(tmp_path), "seed0", root=str(tmp_path))
    (tmp_path / "ensemble.json").write_text(json.dumps({"a": 0.1234567891, "b": [float("nan")]}))
    with pytest.raises(ValueError, match="seed directory"):
        studies.collect(study, str(tmp_path), "../../etc/seed0", root=str(tmp_path))
    (out,) = studies.collect(study, str(tmp_path), "seed0", root=str(tmp_path))
    with open(out) as f:
        assert json.load(f) == {"a": 0.1234568, "b": [None]}  # compact: 7 significant digits, strict JSON


def test_the_serving_table_is_regenerated_from_its_raw_outputs():
    """docs/serving.md's table of the ResNet-56 runs is what benchmarks/serving_table.py prints from the
    committed JSONs, verbatim."""
    from helpers import load_benchmark

    with open(os.path.join(REPO, "docs", "serving.md")) as f:
        page = f.read()
    assert load_benchmark("serving_table.py").table() in page


def test_the_readme_results_table_is_generated_and_checked(tmp_path):
    """README's results table is the generated one; a hand edit (or a stale count) fails the check, and the
    table's counts are the verdicts of the pages' claims tables."""
    root = str(tmp_path)
    shutil.copytree(os.path.join(REPO, "results"), os.path.join(root, "results"))
    shutil.copytree(os.path.join(REPO, "docs", "results"), os.path.join(root, "docs", "results"))
    shutil.copy(os.path.join(REPO, "README.md"), root)
    assert studies.rebuild(root, check=True) == []
    readme = os.path.join(root, "README.md")
    with open(readme) as f:
        text = f.read()
    row = next(line for line in text.splitlines() if line.startswith("| [Cascades on Fashion-MNIST]"))
    with open(readme, "w") as f:
        f.write(text.replace(row, row.replace("| 12 |", "| 13 |", 1)))
    assert studies.rebuild(root, check=True) == [readme]
    page = studies.render_page(studies.STUDIES["titans_fmnist"], root)
    verdicts = studies.claim_verdicts(page)
    assert len(verdicts) == page.split("## Claims and verdicts")[1].split("\n## ")[0].count("\n| ") - 1
    assert set(verdicts) <= set(studies.VERDICTS)


def test_numbers_in_hand_written_heads_and_the_readme_are_backed_by_the_generated_tables(tmp_path, monkeypatch, capsys):
    """No committed head or README sentence states a result number the generated tables do not give; a
    changed accuracy in a head, a ratio no table gives (the old "about 40x"), or a wrong number in README's
    Results prose is named, and `titans-results rebuild --check` then exits 1."""
    from titans.results import claims

    assert studies.unbacked_claims(REPO) == {}
    root = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "results"), root / "results")
    shutil.copytree(os.path.join(REPO, "docs", "results"), root / "docs" / "results")
    shutil.copy(os.path.join(REPO, "README.md"), root)
    assert studies.unbacked_claims(str(root)) == {}
    head = root / "results" / "bdistil_fmnist_strong" / "README.md"
    text = head.read_text()
    assert "0.9435" in text
    head.write_text(text.replace("0.9435", "0.9535", 1).replace("56.9 MFLOPs", "56.9 MFLOPs, about 40x", 1))
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("## Results\n", "## Results\n\nThe teacher reaches 0.9512.\n", 1))
    assert studies.unbacked_claims(str(root)) == {
        "results/bdistil_fmnist_strong/README.md": ["0.9535", "40x"],
        "README.md": ["0.9512"],
    }
    # Rounding: a stated number is backed by a generated one that rounds to it; a ratio within 5%, or the
    # inverse of a generated fraction; code blocks are not prose.
    assert claims.unbacked("acc 0.944 and 0.9435", "| 0.94351 |") == []
    assert claims.unbacked("-0.0043 [-0.0061, +0.0002]", "-0.00431 -0.00608 0.00024") == []
    assert claims.unbacked("about 100x cheaper", "0.010") == [] and claims.unbacked("40x", "0.010") == ["40x"]
    assert claims.unbacked("```\npython x.py --lr=0.1234\n```\n", "") == []
    from titans.results import __main__ as results_cli

    monkeypatch.setattr(studies, "unbacked_claims", functools.partial(studies.unbacked_claims, str(root)))
    monkeypatch.setattr(studies, "rebuild", functools.partial(studies.rebuild, str(root)))
    assert results_cli.cli(["rebuild", "--check"]) == 1
    assert "results/bdistil_fmnist_strong/README.md states numbers no generated table gives: 0.9535, 40x" in (
        capsys.readouterr().err
    )


def test_a_study_declares_its_own_primary_claim():
    """The cascade page marks exactly the declared claim primary: the registry's default for the Fashion-MNIST
    studies, another pair when a study declares it (the text study declares its 1-D CNN)."""
    from titans.cascade import report as cascade_report

    runs = cascade_report.load(studies._run_dirs(studies.STUDIES["titans_fmnist_strong"].raw_dir(REPO)))

    def primary_rows(table):
        return [line.split(" | ")[0] for line in table.splitlines() if " | primary | " in line]

    assert primary_rows(cascade_report.claims(runs)) == [
        "| tiny_easy (msp) beats tiny_standard (msp) at 25% of the teacher's FLOPs"
    ]
    declared = cascade_report.claims(runs, primary=("small_flatten", "small_standard", 0.25))
    assert primary_rows(declared) == ["| small_flatten (msp) beats small_standard (msp) at 25% of the teacher's FLOPs"]
