"""Recomputable results: compact raw outputs committed under results/, and the pages of docs/results
generated from them by one command.

    titans-results collect titans_fmnist /work/runs/titans_fmnist/seed0 seed0   # copy a run's raw outputs in
    titans-results rebuild                                                     # regenerate docs/results/*.md
    titans-results rebuild --check                                             # CI: committed pages are current

A study is a directory results/<study>/ holding README.md (the page's hand-written head: set-up and the
commands that made the raw outputs; it quotes no result) and one directory per run (seed, or
setting/seed) with the files its report reads. docs/results/<study>.md is that head followed by the
generated tables; every number about a result on the page comes from the generated part.
"""

from titans.results.studies import STUDIES, Study, rebuild, render_page

__all__ = ["STUDIES", "Study", "rebuild", "render_page"]
