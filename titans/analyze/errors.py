"""The analysis tools' error type."""


class AnalysisError(ValueError):
    """A workdir that is not a run, or a split that does not exist."""
