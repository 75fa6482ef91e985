"""Quickstart: the whole small pipeline on Fashion-MNIST (offline), on a laptop CPU.

    python -m titans.main --config=configs/quickstart.py --workdir=workdirs/quickstart

Stages: a CNN teacher (cross-entropy), then a much smaller CNN student distilled from it (Hinton KD),
then an evaluation of both on the 10,000 test images, printed as a table (accuracy, ECE, FLOPs per
example, parameters, agreement with the teacher) and written to WORKDIR/summary.md and summary.json.
Rerunning the command skips finished stages and resumes an interrupted one.

arg: epochs per stage (default 3). Runtime on 2 CPU cores: under 10 minutes (measured in the README).
Expected: teacher about 91.5%, student about 1.5 points lower at about 1/13 of the teacher's FLOPs.
"""

import os

import ml_collections

from titans.config import load_config_file

_HERE = os.path.dirname(__file__)


def get_config(arg: str = "3") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage_order = ("teacher", "student")
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + f":{arg}")
    c.stages.student = load_config_file(os.path.join(_HERE, "fmnist_student.py") + f":@teacher,{arg}")
    return c
