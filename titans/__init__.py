"""Titans: teacher/student distillation, cascades and anytime ensembles for efficient inference, in JAX.

The package is laid out in layers (docs/architecture.md): data and models, checkpoints, model loading
(`titans.runs`), soft-label sources (`titans.teachers`), training (`titans.train`), the methods
(`titans.cascade`, `titans.ensemble`, `titans.active`), experiments and analysis.

Importing it changes nothing about the process; the training commands apply their CPU settings
themselves (`titans.host.apply`).
"""

from importlib import metadata

try:
    __version__ = metadata.version("titans")
except metadata.PackageNotFoundError:  # run from a source tree that was not pip-installed
    __version__ = "0.2.0+source"
