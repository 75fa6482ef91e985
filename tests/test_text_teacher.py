"""The text teacher's record against the TF-IDF reference (titans/results/text_teacher.py): per-row correctness
of both on the test split, the bootstrap interval over test rows, the verdict against the 3-point margin."""

import json
import pathlib

import numpy as np
import pytest

from titans import data, runs, stats
from titans.config import load_config_file
from titans.data import text
from titans.results import text_teacher
from titans.stats import PairedDifference
from titans.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_bootstrap_interval_covers_row_sampling_and_the_verdict_reads_the_margin():
    rng = np.random.default_rng(0)
    n = 4000
    # The teacher right on 80% of rows, the reference on 75%: a difference of about +0.05.
    truth_t, truth_r = rng.random(n) < 0.80, rng.random(n) < 0.75
    d = text_teacher.bootstrap_interval([truth_t.astype(float) - truth_r.astype(float)])
    se = np.std(truth_t.astype(float) - truth_r.astype(float), ddof=1) / np.sqrt(n)
    assert d.low < d.mean < d.high and d.high - d.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    # Identical predictions: no difference and no width; the claim is then not reproduced.
    same = text_teacher.bootstrap_interval([np.zeros(n)])
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    assert text_teacher.verdict(same) == "not reproduced"
    assert text_teacher.verdict(PairedDifference(0.05, 0.035, 0.065, 2)) == "reproduced"
    assert text_teacher.verdict(PairedDifference(0.035, 0.025, 0.045, 2)) == "unresolved"
    # Two seeds that disagree widen the interval beyond the rows' part.
    wide = text_teacher.bootstrap_interval([np.full(n, 0.02), np.full(n, 0.08)])
    assert wide.mean == pytest.approx(0.05) and wide.high - wide.low > 0.3


def test_packed_bits_round_trip():
    bits = np.random.default_rng(1).random(11_760) < 0.5
    assert np.array_equal(stats.unpack_bits(stats.pack_bits(bits), len(bits)), bits)


@pytest.mark.skipif(not text.wordnet_available(), reason="needs `apt-get install wordnet-base`")
def test_the_record_holds_both_models_correctness_on_the_test_rows_and_renders_the_claim(data_dir, tmp_path):
    """A small text run stands for the teacher; the reference's predictions (tfidf_reference's JSON format) are
    another run's. The record's bits are each model's correctness row by row; the page states the claim with
    the paired difference of the two test accuracies; a reference of another length is refused."""
    config = load_config_file(str(ROOT / "configs" / "wordnet_smoke.py"))
    config.dataset.data_dir = data_dir
    train_and_evaluate(config, str(tmp_path / "teacher"))
    info = data.dataset_info("wordnet")
    tokens, labels = runs.split_arrays(data.get_source("wordnet", "test", data_dir=data_dir), info)
    rng = np.random.default_rng(0)
    ref_pred = np.where(rng.random(len(labels)) < 0.5, labels, (labels + 1) % 45)  # right on about half
    reference = {"accuracy": float(np.mean(ref_pred == labels)), "eval_split": "test", "C": 4.0, "by_C": []}
    out = text_teacher.record(str(tmp_path / "teacher"), {**reference, "predictions": ref_pred.tolist()})
    model, *_ = runs.load_model(str(tmp_path / "teacher"))
    want = runs.predict(runs.logits_fn, model, tokens, batch_size=512).argmax(-1) == labels
    assert np.array_equal(stats.unpack_bits(out["teacher"]["correct"], len(labels)), want)
    assert np.array_equal(stats.unpack_bits(out["reference"]["correct"], len(labels)), ref_pred == labels)
    assert out["teacher"]["test_accuracy"] == pytest.approx(want.mean())
    assert out["config"]["model"]["name"] == "text_bag" and "revision" in out["provenance"]
    page = text_teacher.render([json.loads(json.dumps(out))])
    row = next(line for line in page.splitlines() if line.startswith("| The text_bag teacher (from scratch) clears"))
    assert f"{want.mean() - (ref_pred == labels).mean():+.4f} [" in row and row.endswith("| not reproduced |")
    with pytest.raises(ValueError, match="11760 rows"):
        text_teacher.record(str(tmp_path / "teacher"), {**reference, "predictions": ref_pred[:-1].tolist()})
    with pytest.raises(ValueError, match="predictions on 'test'"):
        text_teacher.record(str(tmp_path / "teacher"), reference)


def _record(correct, ref_correct, seed, pretrain=None):
    n = len(correct)
    return {
        "examples": n,
        "labels_sha256": "same rows",
        "teacher": {
            "model": "transformer",
            "correct": stats.pack_bits(correct),
            "test_accuracy": correct.mean(),
            "flops_per_example_at_32": 2e8,
            "validation_accuracy": None,
            "train_time_s": 10.0,
        },
        "reference": {"correct": stats.pack_bits(ref_correct), "accuracy": ref_correct.mean(), "C": 16.0, "by_C": []},
        "pretrain": pretrain,
        "config": {"seed": seed},
    }


def test_each_training_recipe_gets_its_own_claim_row_and_interval():
    """Teachers trained from scratch and after a masked-LM stage are not pooled: each recipe's seeds make
    their own interval, the from-scratch one first (primary), the masked-LM one as the declared fallback."""
    n = 4000
    rng = np.random.default_rng(0)
    ref = rng.random(n) < 0.78
    scratch = [np.where(rng.random(n) < 0.02, ~ref, ref) | (rng.random(n) < 0.1) for _ in range(2)]
    strong = [ref | (rng.random(n) < 0.3) for _ in range(2)]
    pre = {"masked_lm": True, "epochs": 3.0, "mlm_accuracy": 0.4, "train_time_s": 5.0}
    records = [
        _record(strong[0], ref, 0, pre),
        _record(scratch[0], ref, 0),
        _record(scratch[1], ref, 1),
        _record(strong[1], ref, 1, pre),
    ]
    page = text_teacher.render(records)
    rows = [line for line in page.splitlines() if line.startswith("| The transformer teacher (")]
    assert len(rows) == 2
    assert "(from scratch)" in rows[0] and "| primary | 2 |" in rows[0]
    assert "(masked-LM pre-trained (3 epochs))" in rows[1] and "| declared fallback | 2 |" in rows[1]
    want = np.mean([(s.astype(float) - ref).mean() for s in strong])
    assert f"| {want:+.4f} [" in rows[1]
    assert "5 s + 10 s" in page


def test_the_record_command_is_a_titans_results_subcommand(capsys, tmp_path):
    from titans.results import __main__ as results_cli

    with pytest.raises(SystemExit) as done:
        results_cli.cli(["text-teacher", "--help"])
    assert done.value.code == 0 and "--teacher_workdir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        results_cli.cli(["text-teacher", "--reference=x.json"])
    assert done.value.code == 2
    (tmp_path / "ref.json").write_text(json.dumps({"eval_split": "validation", "predictions": []}))
    assert (
        results_cli.cli(["text-teacher", f"--teacher_workdir={tmp_path}", f"--reference={tmp_path / 'ref.json'}"]) == 2
    )
    assert "predictions on 'test'" in capsys.readouterr().err
