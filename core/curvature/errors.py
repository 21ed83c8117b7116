"""The curvature toolkit's one exception: a bad argument, named."""

from __future__ import annotations

__all__ = ["CurvatureArgumentError"]


class CurvatureArgumentError(ValueError):
    """A curvature operator cannot be built as asked. A ``ValueError`` whose ``argument``
    names the argument at fault (``"params"``, ``"kind"``, ``"loss_fn"``, ``"method"``...),
    so that a caller can say it in its own words (a probe names its option)."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument
