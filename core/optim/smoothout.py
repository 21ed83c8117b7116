"""SmoothOut and AdaSmoothOut (Wen et al. 2018): gradients averaged over randomly perturbed weights."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..batch import as_adapter, batch_size_of, chunks
from ._base import WrappedOptimizer, batchnorm_parameters

__all__ = ["SmoothOut", "smoothout_coefficient", "smoothout_noise", "ghost_closures", "NoisyReLU", "noisy_relus",
           "SCHEDULES", "SHAPES", "DISTRIBUTIONS"]

SCHEDULES = ("constant", "anneal", "tanh")
SHAPES = ("none", "weight", "filter")
DISTRIBUTIONS = ("uniform", "normal")


class SmoothOut(WrappedOptimizer):
    """Noise injected per ghost chunk, gradients averaged, clipped, then the base step.

    SmoothOut (``shape="none"``) and AdaSmoothOut (``shape="filter"``):
    ``SmoothOut(params, torch.optim.SGD, ss=0.006, lr=0.1)`` builds the base over ``params``;
    ``SmoothOut(base, ss=0.006)`` wraps an optimizer already built. Options: ``ss``,
    ``schedule``, ``total_steps``, ``shape``, ``distribution``, ``denoise``, ``clip``,
    ``model``, ``exclude_batchnorm``, ``generator``, ``anneal_index``, ``tanh_scale``
    (prefix ``smoothout_`` on a clash with the base's names); the rest go to the base.

    ``step(closure)`` takes one closure (one chunk: the whole batch) or a sequence of
    closures, one per ghost chunk (see :func:`ghost_closures`), with optional ``weights``
    (chunk sizes) and ``divisor`` (default: the sum of the weights). For each chunk: draw
    τ (:func:`smoothout_noise`, amplitude ``ss · smoothout_coefficient(schedule, t,
    total_steps)``), add it to the parameters, call the closure, then put the weights back
    exactly (``denoise=True``; with ``denoise=False`` the noise stays). With ``ss=0``
    nothing is drawn: the random stream is untouched, as in the original. The chunk
    gradients are summed with weights w_c/``divisor`` (the weighted mean by default),
    clipped to norm ``clip`` (None: no clipping), and ``base.step()`` applies the update.
    BatchNorm affine parameters get no noise when ``model`` is given and
    ``exclude_batchnorm`` is true. ``stats`` holds ``amplitude`` and ``grad_norm``
    (before clipping) after each step.
    """

    prefix = "smoothout_"

    def __init__(self, params: Iterable[Any] | torch.optim.Optimizer | None, base_optimizer: Any = None,
                 ss: float = 0.006, **kwargs: Any):
        super().__init__(params, base_optimizer, ss=ss, **kwargs)

    def configure(
        self,
        ss: float = 0.006,
        schedule: str = "constant",
        total_steps: int | None = None,
        shape: str = "none",
        distribution: str = "uniform",
        denoise: bool = True,
        clip: float | None = 5.0,
        model: nn.Module | None = None,
        exclude_batchnorm: bool = True,
        generator: torch.Generator | None = None,
        anneal_index: float = 0.55,
        tanh_scale: float = 10.0,
    ) -> None:
        """The SmoothOut options (see the class docstring)."""
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("shape", shape, SHAPES)
        _check_choice("distribution", distribution, DISTRIBUTIONS)
        if schedule == "tanh" and not total_steps:
            raise ValueError("schedule 'tanh' needs total_steps (the number of updates of the run)")
        self.ss = float(ss)
        self.schedule = schedule
        self.total_steps = total_steps
        self.shape = shape
        self.distribution = distribution
        self.denoise = bool(denoise)
        self.clip = clip
        self.generator = generator
        self.anneal_index = float(anneal_index)
        self.tanh_scale = float(tanh_scale)
        skip = batchnorm_parameters(model) if exclude_batchnorm else set()
        self.noised = [p for p in self.parameters() if id(p) not in skip]

    @property
    def amplitude(self) -> float:
        """The noise amplitude a = ss · coef_t for the next step."""
        return self.ss * smoothout_coefficient(self.schedule, self.t, self.total_steps, self.anneal_index,
                                               self.tanh_scale)

    def step(self, closure=None, weights: Sequence[float] | None = None, divisor: float | None = None):
        """One update over all ghost chunks; returns the weighted mean loss of the chunks.

        The gradient is Σ w_c g_c / ``divisor`` (default: Σ w_c, the weighted mean).
        """
        self.require_closure(closure)
        closures = [closure] if callable(closure) else list(closure)
        weights = [1.0] * len(closures) if weights is None else [float(w) for w in weights]
        if len(weights) != len(closures):
            raise ValueError(f"{len(closures)} closures but {len(weights)} weights")
        total = sum(weights)
        divisor = total if divisor is None else float(divisor)
        params = self.parameters()
        a = self.amplitude
        # ss = 0: no noise and no draw, so the random stream is left as it was (the seed
        # draws only `if args.sharpness_smoothing`)
        noisy = self.ss != 0
        accumulate = len(closures) > 1 or divisor != total
        acc = None
        loss_sum = 0.0
        for c, w in zip(closures, weights):
            saved = None
            if noisy:
                with torch.no_grad():
                    saved = [p.detach().clone() for p in self.noised] if self.denoise else None
                    # a fresh τ per chunk, drawn around the noise-free weights
                    torch._foreach_add_(self.noised, smoothout_noise(self.noised, a, self.shape, self.distribution,
                                                                     self.generator))
            loss = c()
            loss_sum = loss_sum + w * (loss.detach() if torch.is_tensor(loss) else float(loss))
            with torch.no_grad():
                if saved is not None:
                    torch._foreach_copy_(self.noised, saved)
                if accumulate:
                    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                    if acc is None:
                        acc = [g.mul(w / divisor) for g in grads]
                    else:
                        torch._foreach_add_(acc, grads, alpha=w / divisor)
        with torch.no_grad():
            if acc is not None:
                for p, g in zip(params, acc):
                    p.grad = g
            with_grad = [p for p in params if p.grad is not None]
            if self.clip is not None and with_grad:
                norm = torch.nn.utils.clip_grad_norm_(with_grad, self.clip)
            else:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in with_grad]))) if with_grad else torch.zeros(())
        self.stats = {"amplitude": a, "grad_norm": float(norm)}
        self.base.step()
        self.variant_state["t"] += 1
        return loss_sum / total


def smoothout_coefficient(schedule: str, t: int, total_steps: int | None = None, anneal_index: float = 0.55,
                          tanh_scale: float = 10.0) -> float:
    """coef_t of the noise amplitude at update ``t`` (0-based) of ``total_steps``.

    ``constant``: 1; ``anneal``: (1 + t)^(−ai/2) (the seed: (1/(1 + t)^ai)^½, ``--anneal-index``
    ai = 0.55); ``tanh``: (tanh(ts(t/T − ½)) + 1)/2 (``--tanh-scale`` ts = 10).
    """
    if schedule == "constant":
        return 1.0
    if schedule == "anneal":
        return (1.0 + t) ** (-anneal_index / 2)
    if schedule == "tanh":
        if not total_steps:
            raise ValueError("schedule 'tanh' needs total_steps")
        return (math.tanh(tanh_scale * (t / total_steps - 0.5)) + 1.0) / 2.0
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def smoothout_noise(
    tensors: Sequence[torch.Tensor],
    amplitude: float,
    shape: str = "none",
    distribution: str = "uniform",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Draw τ for each tensor w, of amplitude a.

    ``none``: τ = a·u; ``weight``: τ = a·|w|·u (elementwise); ``filter`` (AdaSmoothOut):
    for each row j along dim 0, τ_j = a·‖w_j‖·u_j/(‖u_j‖ + 1e-6), so that every row's
    perturbation has the length of that row scaled by a (a 1-D tensor's rows are its
    entries). u ~ U(−1, 1) (``uniform``) or N(0, 1) (``normal``), elementwise.
    """
    out = []
    for w in tensors:
        w = w.detach()
        if distribution == "uniform":
            u = torch.rand(w.shape, generator=generator, dtype=w.dtype, device=w.device).mul_(2).sub_(1)
        elif distribution == "normal":
            u = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
        else:
            raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
        if shape == "none":
            tau = u.mul_(amplitude)
        elif shape == "weight":
            tau = u.mul_(w.abs()).mul_(amplitude)
        elif shape == "filter":
            rows_w = w.reshape(w.shape[0], -1) if w.dim() > 0 else w.reshape(1, 1)
            rows_u = u.reshape(rows_w.shape)
            scale = amplitude * torch.linalg.vector_norm(rows_w, dim=1, keepdim=True) / (torch.linalg.vector_norm(rows_u, dim=1, keepdim=True) + 1e-6)
            tau = (rows_u * scale).reshape(w.shape)
        else:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        out.append(tau)
    return out


class NoisyReLU(nn.Module):
    """ReLU with a random slope (the SmoothOut code's ``models/noisy_relu.py``): max(0, x·u),
    u ~ U(a, b) elementwise, a fresh draw at every forward pass in train mode.

    The original also draws in eval mode; here eval mode is the plain ReLU (``noisy_eval``
    true for the original's behaviour). No parameters or buffers, so state dicts are
    unchanged. u comes from the global torch RNG (the training stream's), as the original.
    """

    def __init__(self, a: float, b: float, noisy_eval: bool = False):
        super().__init__()
        if not a <= b:
            raise ValueError(f"NoisyReLU needs a <= b, got a={a}, b={b}")
        self.a, self.b, self.noisy_eval = float(a), float(b), bool(noisy_eval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.noisy_eval):
            return torch.relu(x)
        u = torch.rand(x.shape, dtype=x.dtype, device=x.device).mul_(self.b - self.a).add_(self.a)
        return torch.relu(x * u)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}"


def noisy_relus(model: nn.Module, a: float, b: float, noisy_eval: bool = False) -> int:
    """Replace every ``nn.ReLU`` module of ``model`` by a :class:`NoisyReLU` in place; returns how many.

    Functional ``relu`` calls inside ``forward`` cannot be reached; a model without ReLU
    modules gets none (the caller decides whether that is an error).
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, NoisyReLU(a, b, noisy_eval))
                count += 1
    return count


def ghost_closures(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    mb: int,
    zero_grad: Callable[[], None] | None = None,
) -> tuple[list[Callable[[], torch.Tensor]], list[int]]:
    """Split ``batch`` into ghost chunks of at most ``mb`` samples; one closure and its size per chunk.

    Each closure zeroes the gradients (``zero_grad``, default ``model.zero_grad``), runs
    forward and backward on its chunk and returns the detached mean loss.
    """
    adapter = as_adapter(loss_fn)  # a loss_fn(output, target) or the run's batch adapter
    zero = zero_grad or (lambda: model.zero_grad(set_to_none=True))
    closures, sizes = [], []
    for piece in chunks(batch, mb):

        def closure(piece=piece):
            zero()
            with torch.enable_grad():
                loss = adapter.loss(model, piece)
                loss.backward()
            return loss.detach()

        closures.append(closure)
        sizes.append(batch_size_of(piece))
    return closures, sizes


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
