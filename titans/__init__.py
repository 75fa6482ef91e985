"""Titans: teacher/student distillation and cascades for efficient inference, in JAX."""

__version__ = "0.1.0"
