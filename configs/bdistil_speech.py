"""B-DISTIL on Google Speech Commands (12 classes): an anytime ensemble of 1-D conv students.

    TITANS_SPEECH_DIR=/path/to/speech_commands_v0.02 \
    python -m titans.main --config=configs/bdistil_speech.py:seed=0 --workdir=workdirs/bdistil_speech/seed0

Data: the extracted speech_commands_v0.02.tar.gz (no TensorFlow needed): Titans' own builder
(titans/data/speech.py) turns every clip into a uint8 log-mel spectrogram of 49 frames x 40 bands and
prepares it as ArrayRecord on first use. TFDS's own `speech_commands` cannot be used without
TensorFlow (its Audio feature needs TF even to be read).

Teacher (unless `teacher=RUN_DIR`): a 2-D CNN over the spectrogram (conv 32-64, dense 128, 15 epochs).
Members: FIND-WL among 1-D conv nets over time (mel bands as channels; `conv1d`,
titans/models/audio.py) of 16, 32 and 64 channels, up to `rounds` (4), each `epochs` (10) with KD
(T=4, alpha=0.9) on F_{w-1} + f_w under the weight player's weights; member w >= 2 reads member
w-1's `features` (concat after a 16-wide projection). Baselines: resched and no-resched as in
configs/bdistil_fmnist.py. Splits: the clips in validation_list.txt are the validation split, those in
testing_list.txt the test split, all others train.

arg: comma-separated key=value: seed (0), teacher ("" = train one), teacher_epochs (15), epochs (10),
rounds (4), weights (example | example_class), gamma (0.02).
Runtime, an ESTIMATE (not run in this repository; the archive is 2.3 GB): preparing
the features about 10-20 min on 2 cores; then, on 2 CPU cores, roughly 1-2 min per member-epoch,
so several hours a seed; minutes on a GPU. Expected result: not measured here.
"""

import ml_collections

from titans.config import base_config
from titans.ensemble.config import defaults, model_entry


def _args(arg: str) -> dict:
    out = dict(seed="0", teacher="", teacher_epochs="15", epochs="10", rounds="4", weights="example", gamma="0.02")
    for part in filter(None, arg.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"Unknown argument '{key}' for bdistil_speech.py; expected {sorted(out)}.")
        out[key] = value
    return out


def _run(name: str, seed: int, epochs: float) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = name
    c.seed = seed
    c.dataset.name = "speech_commands"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.model.name = "cnn"
    c.model.kwargs = ml_collections.ConfigDict(dict(channels=(32, 64), dense=128))
    c.batch_size = 128
    c.eval_batch_size = 500
    c.total_epochs = epochs
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 1e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 200
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 100
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = _args(arg)
    seed = int(a["seed"])
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    if a["teacher"]:
        c.stage_order = ()
        teacher_ref = a["teacher"]
    else:
        c.stages.teacher = _run("teacher", seed, float(a["teacher_epochs"]))
        c.stage_order = ("teacher",)
        teacher_ref = "@teacher"

    member = _run("member", seed, float(a["epochs"]))
    member.distill.teacher_workdir = teacher_ref
    member.distill.loss = "kd"
    member.distill.temperature = 4.0
    member.distill.alpha = 0.9

    e = defaults()
    e.member = member
    e.candidates = ml_collections.ConfigDict(
        {f"conv1d_{w}": model_entry("conv1d", channels=(w, w), kernel=5, dense=w) for w in (16, 32, 64)}
    )
    e.rounds = int(a["rounds"])
    e.weights = a["weights"]
    e.gamma = float(a["gamma"])
    e.connect.layer = "features"
    e.connect.join = "concat"
    e.connect.width = 16
    e.no_resched = ml_collections.ConfigDict(
        {f"conv1d_{w}": model_entry("conv1d", channels=(w, w, w), kernel=5, dense=w) for w in (32, 48, 64, 96, 128)}
    )
    e.val_split = "validation"
    e.test_split = "test"
    e.predict_batch_size = 500
    c.ensemble = e
    return c
