"""The methods on text: configs/titans_wordnet.py's cascade pipeline at small sizes on the WordNet benchmark,
from the teacher cache to the real runner on token batches."""

import json
import pathlib

import numpy as np
import pytest

from titans import data, experiment, models, runs
from titans.config import load_config_file
from titans.data import text

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not text.wordnet_available(), reason="needs `apt-get install wordnet-base`")


def test_the_text_cascade_pipeline_runs_to_the_real_runner_on_token_batches(data_dir, text_teacher, tmp_path):
    """configs/titans_wordnet.py trains bag-of-embeddings students from the cache and evaluates the cascade:
    costs are XLA's FLOPs averaged over the test rows at their length buckets, and the real runner, which
    runs the teacher only on the deferred token rows, gives the predictions of the simulated sweep."""
    arg = (
        f"teacher_dir={text_teacher / 'teacher'},cache_dir={text_teacher / 'cache'},train_split=train[:2000],"
        "val_split=validation[:400],test_split=test[:400],epochs=1,sizes=bag,baselines=,objectives=standard+easy"
    )
    config = load_config_file(f"{ROOT / 'configs' / 'titans_wordnet.py'}:{arg}")
    for name in config.stage_order:
        config.stages[name].dataset.data_dir = data_dir
    experiment.run_experiment(config, str(tmp_path))
    out = json.loads((tmp_path / "cascade.json").read_text())
    assert sorted(out["students"]) == ["bag_easy", "bag_standard"] and out["test_examples"] == 400
    # FLOPs: the mean over the 400 test rows of the model's FLOPs at each row's bucket.
    info = data.dataset_info("wordnet")
    tokens, _ = runs.split_arrays(data.get_source("wordnet", "test[:400]", data_dir=data_dir), info)
    buckets = [text.bucket_length(row[None]) for row in tokens]
    teacher, *_ = runs.load_model(str(text_teacher / "teacher"))
    module = teacher.module()
    per_bucket = {b: models.flops_per_example(module, (b,)) for b in set(buckets)}
    want = np.mean([per_bucket[b] for b in buckets])
    assert out["teacher"]["flops_per_example"] == pytest.approx(want, rel=1e-6)
    assert len(set(buckets)) >= 2 and want < models.flops_per_example(module, (128,))
    for name in out["students"]:
        for rate, point in out["students"][name]["gates"]["msp"]["at_deferral_rate"].items():
            assert point["runner_disagreements_with_sweep"] == 0, (name, rate)
            assert point["runner_test_accuracy"] == pytest.approx(point["test_accuracy"], abs=1e-6)
