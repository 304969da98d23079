"""One family of error types for every mistake a user can make, so that the CLI (and any caller)
can catch `QalignError` and print its one-line message instead of a traceback.

Each subclass is still a `ValueError`, so code written against the older, narrower types keeps
working. Messages name what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = ["QalignError", "OptionsError"]


class QalignError(ValueError):
    """Bad input to the toolkit: a spec, model, text, option or configuration that cannot run."""


class OptionsError(QalignError):
    """A method's or a run's options that are out of range or do not apply to the chosen mode."""


class NonFiniteError(QalignError):
    """A weight or Hessian holding NaN or Inf: quantizing it would hide the damage in codes."""


class CheckpointError(QalignError):
    """A quantized checkpoint that is damaged, tampered with or written by something else."""


__all__ += ["NonFiniteError", "CheckpointError"]


class ExportError(QalignError):
    """A model, spec or target folder that an export format (ptq.export) cannot take."""


__all__ += ["ExportError"]
