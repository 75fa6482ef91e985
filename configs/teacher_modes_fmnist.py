"""Teacher modes on Fashion-MNIST: the same KD student with soft labels online, from a cache, or from the service.

Teacher: the cnn 32-64/128 of `configs/titans_fmnist.py` (trained on train[:90%], 7.97 MFLOPs/example);
student: cnn 8-16/32 (0.61 MFLOPs/example, 13x cheaper), Hinton KD (T=4, alpha=0.9), train[:90%],
`epochs` epochs; evaluated on the 10,000 test images.

    export TFDS_DATA_DIR=/tmp/tfds_dev
    # cache mode needs the cache first (resumable; ~1 min on 2 CPU cores):
    python -m titans.teachers.cache --config=configs/teacher_modes_fmnist.py:mode=cache,seed=0
    python -m titans.main --config=configs/teacher_modes_fmnist.py:mode=cache,seed=0 \
        --workdir=workdirs/teacher_modes/cache/seed0
    # likewise mode=online and mode=service (a local Ray with 1-2 teacher workers)

arg: comma-separated key=value: mode (online | cache | service), seed (0), epochs (1),
teacher_root (workdirs/titans_fmnist: the teacher is TEACHER_ROOT/seed{seed}/teacher),
cache_root (workdirs/teacher_modes/caches: the cache is CACHE_ROOT/seed{seed}).
Runtime on 2 CPU cores: 2-4 minutes a run. Expected: the three modes give the same student (the same
soft labels; tests/test_teachers.py checks it); speed per mode: benchmarks/teacher_modes.py.
"""

import os

import ml_collections

from titans.config import load_config_file

_HERE = os.path.dirname(__file__)


def _args(arg: str) -> dict:
    out = dict(
        mode="online",
        seed="0",
        epochs="1",
        teacher_root="workdirs/titans_fmnist",
        cache_root="workdirs/teacher_modes/caches",
    )
    for part in filter(None, arg.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"Unknown argument '{key}' for teacher_modes_fmnist.py; expected {sorted(out)}.")
        out[key] = value
    return out


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = _args(arg)
    seed = int(a["seed"])
    c = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":" + a["epochs"])
    c.name = f"student_{a['mode']}"
    c.seed = seed
    c.dataset.train_split = "train[:90%]"
    c.log_every_steps = 100
    c.model.kwargs = ml_collections.ConfigDict(dict(channels=(8, 16), dense=32))
    c.distill.teacher_workdir = os.path.join(a["teacher_root"], f"seed{seed}", "teacher")
    c.distill.loss = "kd"
    c.distill.temperature = 4.0
    c.distill.alpha = 0.9
    c.distill.teacher_mode = a["mode"]
    c.distill.cache.dir = os.path.join(a["cache_root"], f"seed{seed}")
    c.distill.service.min_workers = 1
    c.distill.service.max_workers = 2
    c.distill.service.max_in_flight = 8
    return c
