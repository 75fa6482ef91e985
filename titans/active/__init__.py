"""Robust active distillation (docs/methods.md#robust-active-distillation): buy teacher soft labels where they are informative and right.

    from titans.active import selection, loop
    idx, p = selection.select_robust(key, gain, available, b, m)   # game + DepRound
    result = loop.run_active(config, workdir)                       # the whole loop, resumable

See docs/active.md.
"""
