"""Titans: teacher/student distillation, cascades and anytime ensembles for efficient inference, in JAX.

The package is laid out in layers (docs/architecture.md): data and models, checkpoints, model loading
(`titans.runs`), soft-label sources (`titans.teachers`), training (`titans.train`), the methods
(`titans.cascade`, `titans.ensemble`, `titans.active`), experiments and analysis.
"""

from importlib import metadata

from titans import host_malloc

# The Titans training commands run under jemalloc where it is installed (titans.host_malloc): the process
# re-executes itself with it preloaded here, before JAX is imported.
if host_malloc.is_cli_process():
    host_malloc.preload()

try:
    __version__ = metadata.version("titans")
except metadata.PackageNotFoundError:  # run from a source tree that was not pip-installed
    __version__ = "0.2.0+source"
