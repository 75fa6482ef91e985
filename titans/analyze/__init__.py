"""Analysis of finished runs: evaluation, plots, per-example hardness, HTML reports, comparisons, inspection.

    python -m titans.analyze WORKDIR [WORKDIR ...]                 # analysis/ next to each run
    python -m titans.analyze --compare W1 W2 ... --out=DIR         # one table over runs (mean ± sd over seeds)
    python -m titans.analyze --inspect WORKDIR [--diff=STEP_A,STEP_B | --diff_with=OTHER]

Methods plug their own outputs into a run's report with :func:`register_section` (see
``titans/analyze/sections.py``; the cascade evaluation's curves are one such section).
"""

from titans.analyze.compare import compare_runs
from titans.analyze.inspect import diff_checkpoints, inspect_checkpoint
from titans.analyze.run import AnalysisError, analyze_path, analyze_run
from titans.analyze.sections import register_section

__all__ = [
    "AnalysisError",
    "analyze_path",
    "analyze_run",
    "compare_runs",
    "diff_checkpoints",
    "inspect_checkpoint",
    "register_section",
]
