"""1-D and 2-D slices of the loss: evaluate at θ + αd₁ + βd₂ by perturbing parameters in place."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from lscape.batch import as_adapter, batch_size_of
from torch import nn

__all__ = ["parse_range", "evaluate", "Displacement", "displaced", "slice_1d", "surface_rows", "surface_2d"]


#: the most points one range may have (one axis of a landscape, an interpolation path)
MAX_RANGE_POINTS = 1_000_000


def parse_range(spec: str | Sequence[float] | np.ndarray, max_points: int = MAX_RANGE_POINTS) -> np.ndarray:
    """Coefficients from a range string, or a list/array of floats returned unchanged.

    Three forms, read by these rules in order:

    - ``"a:b:#n"``: ``n`` points from a to b inclusive (``np.linspace``).
    - ``"a:b:n"`` with ``n`` written as an integer (no ``.``, no exponent), ``n ≥ 2`` and
      ``n > |b − a|``: loss-landscape's ``xmin:xmax:xnum``, ``n`` points from a to b
      inclusive (``"-1:1:51"`` is Li et al.'s 51 points in [−1, 1]).
    - otherwise a step form: of the last two numbers the one smaller in magnitude is the
      step, so SmoothOut's ``start:step:stop`` (``"-0.3:0.02:0.31"``) and ``start:stop:step``
      (``"-1:2:0.1"``) both read as meant. The stop is included when it lies on the grid
      (within 1e-6 of a step), excluded otherwise, so ``"-0.3:0.02:0.31"`` gives −0.3 … 0.3
      as in the original.

    An integer third number ``n ≥ 2`` with ``n ≤ |b − a|`` (``"0:10:2"``: 2 points, or steps
    of 2?) is ambiguous and refused with a ValueError that names both spellings.

    A range of more than ``max_points`` points is refused before any array is made
    (``"-1:1:1e-12"`` would ask numpy for 2·10¹² floats).
    """
    if not isinstance(spec, str):
        return np.asarray(spec, dtype=float)
    parts = [p.strip() for p in spec.split(":")]
    usage = f"bad range '{spec}': use start:stop:#num (like -1:1:#51), xmin:xmax:xnum (-1:1:51) or start:stop:step (-1:2:0.1)"
    if len(parts) != 3:
        raise ValueError(usage)
    try:
        if parts[2].startswith("#"):
            num = int(parts[2][1:])
            if num < 1:
                raise ValueError
            lo, hi = float(parts[0]), float(parts[1])
        else:
            a, b, c = (float(v) for v in parts)
    except ValueError:
        raise ValueError(usage) from None
    if parts[2].startswith("#"):
        _require_points(spec, num, max_points)
        return np.linspace(lo, hi, num)
    if not all(math.isfinite(v) for v in (a, b, c)):
        raise ValueError(f"bad range '{spec}': the numbers must be finite")
    if _is_integer_literal(parts[2]) and c >= 2:
        if c > abs(b - a):
            _require_points(spec, c, max_points)
            return np.linspace(a, b, int(c))
        raise ValueError(f"ambiguous range '{spec}': write {parts[0]}:{parts[1]}:#{int(c)} for {int(c)} points, "
                         f"or {parts[0]}:{parts[1]}:{c!r} for the step form (start:stop:step or start:step:stop)")
    start, step, stop = (a, b, c) if abs(b) <= abs(c) else (a, c, b)
    if step == 0 or (stop - start) / step < 0:
        raise ValueError(usage)
    count = (stop - start) / step + 1
    _require_points(spec, count, max_points)
    n = math.floor((stop - start) / step + 1e-6) + 1
    # multiply rather than accumulate so that 0 comes out as exactly 0
    return np.round(start + step * np.arange(n), 12)


def _require_points(spec: str, count: float, max_points: int) -> None:
    if count > max_points:
        raise ValueError(f"range '{spec}' has {count:.3g} points, more than the {max_points:,} one range may have: "
                         "use a coarser step or fewer points")


def _is_integer_literal(text: str) -> bool:
    """Whether ``text`` is written as an integer: digits with an optional sign, no point or exponent."""
    body = text[1:] if text[:1] in "+-" else text
    return body.isdigit()


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable, batches: Iterable) -> tuple[float, float]:
    """Size-weighted mean loss and accuracy of ``model`` over ``batches`` in its current mode.

    Accuracy is argmax over the last output dimension against integer targets, NaN when
    the targets are not class indices (regression).
    """
    adapter = as_adapter(loss_fn)
    total, loss_sum, correct, counted = 0, 0.0, 0, 0
    for batch in batches:
        loss, (out, y) = adapter.loss_and_output(model, batch)
        n = batch_size_of(batch)
        loss_sum += float(loss) * n
        total += n
        if isinstance(y, torch.Tensor) and out is not None and not torch.is_floating_point(y) and out.dim() >= 2 \
                and out.shape[:-1] == y.shape:
            correct += int((out.argmax(-1) == y).sum())
            counted += y.numel()
    if total == 0:
        raise ValueError("no batches to evaluate on")
    return loss_sum / total, (correct / counted if counted else float("nan"))


class Displacement:
    """Moves ``params`` to θ₀ + Σ cₖ dₖ in place, keeping one copy of θ₀ to return to.

    One copy of the parameters is held however many points are evaluated; every point is
    set from θ₀ afresh (no drift from accumulated updates), and ``restore`` copies θ₀
    back bit for bit.
    """

    def __init__(self, params: Sequence[torch.Tensor], directions: Sequence[Sequence[torch.Tensor]]):
        self.params = list(params)
        self.directions = [list(d) for d in directions]
        for d in self.directions:
            if len(d) != len(self.params) or any(a.shape != b.shape for a, b in zip(d, self.params)):
                raise ValueError("a direction must have one tensor shaped like each parameter")
        self.base = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def move(self, *coeffs: float) -> None:
        """Set the parameters to θ₀ + Σ coeffs[k]·directions[k]."""
        if len(coeffs) != len(self.directions):
            raise ValueError(f"{len(self.directions)} coefficients expected")
        for i, p in enumerate(self.params):
            p.copy_(self.base[i])
            for c, d in zip(coeffs, self.directions):
                if c != 0:
                    p.add_(d[i], alpha=float(c))

    @torch.no_grad()
    def restore(self) -> None:
        """Put θ₀ back."""
        for p, b in zip(self.params, self.base):
            p.copy_(b)


@contextmanager
def displaced(model: nn.Module, params, directions, mode: str = "eval") -> Iterator[Displacement]:
    """Context manager: a ``Displacement`` with the model in ``mode``; θ₀ and the mode are restored on exit."""
    was_training = model.training
    disp = Displacement(params, directions)
    model.train(mode == "train")
    try:
        yield disp
    finally:
        disp.restore()
        model.train(was_training)


def slice_1d(model, loss_fn, batches, params, direction, alphas, mode: str = "eval") -> dict[str, np.ndarray]:
    """Loss and accuracy along θ + αd for every α in ``alphas``; returns ``{"alpha", "loss", "accuracy"}``."""
    alphas = parse_range(alphas)
    batches = list(batches)
    loss, acc = np.empty(len(alphas)), np.empty(len(alphas))
    with displaced(model, params, [direction], mode) as disp:
        for i, a in enumerate(alphas):
            disp.move(a)
            loss[i], acc[i] = evaluate(model, loss_fn, batches)
    return {"alpha": alphas, "loss": loss, "accuracy": acc}


def surface_rows(model, loss_fn, batches, params, d1, d2, alphas, betas, start_row: int = 0, mode: str = "eval"):
    """Yield ``(i, loss_row, accuracy_row)`` for rows α_i of the surface θ + α_i d₁ + β_j d₂.

    Starts at row ``start_row`` so that an interrupted surface resumes; the caller writes
    each row as it comes. θ₀ is restored when the generator finishes or is closed.
    """
    alphas, betas = parse_range(alphas), parse_range(betas)
    batches = list(batches)
    with displaced(model, params, [d1, d2], mode) as disp:
        for i in range(start_row, len(alphas)):
            loss, acc = np.empty(len(betas)), np.empty(len(betas))
            for j, b in enumerate(betas):
                disp.move(alphas[i], b)
                loss[j], acc[j] = evaluate(model, loss_fn, batches)
            yield i, loss, acc


def surface_2d(model, loss_fn, batches, params, d1, d2, alphas, betas, mode: str = "eval") -> dict[str, np.ndarray]:
    """The whole surface at once: ``{"alpha", "beta", "loss" (A, B), "accuracy" (A, B)}``."""
    alphas, betas = parse_range(alphas), parse_range(betas)
    loss = np.empty((len(alphas), len(betas)))
    acc = np.empty_like(loss)
    for i, lr, ar in surface_rows(model, loss_fn, batches, params, d1, d2, alphas, betas, mode=mode):
        loss[i], acc[i] = lr, ar
    return {"alpha": alphas, "beta": betas, "loss": loss, "accuracy": acc}
