"""lscape's optimizer variants as plain optimizers for any training loop: ``lscape.optim``.

SAM/ASAM (Foret et al. 2021; Kwon et al. 2021), SmoothOut/AdaSmoothOut (Wen et al. 2018) and
Entropy-SGD (Chaudhari et al. 2017), with the ``torch.optim`` closure convention::

    opt = lscape.optim.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)      # the loss at θ, before the update

``base_optimizer`` is a ``torch.optim.Optimizer`` class (built over ``params`` with the
keyword arguments it accepts) or an optimizer already built (``params=None``, or the
optimizer alone as the first argument: ``SAM(base, rho=0.05)``). Every other keyword is the
variant's; a name both accept (Adam's ``eps``, SGD's ``momentum``) goes to the base, and the
variant's is given with its prefix: ``sam_eps``, ``langevin_momentum``, ``smoothout_...``.
Each variant is a ``torch.optim.Optimizer`` subclass built through ``Optimizer.__init__``
(:class:`WrappedOptimizer`): learning-rate schedulers, Lightning's ``configure_optimizers``
and the HF Trainer take it; ``param_groups``, ``state`` and ``defaults`` are the base
optimizer's, ``state_dict`` holds the base's state and the variant's counters. Entropy-SGD's
closure must draw a NEW minibatch at every call (it makes L + 1 calls per step); SmoothOut's
``step`` also takes a list of closures, one per ghost chunk (:func:`ghost_closures`).

The ``sam``, ``smoothout`` and ``entropy-sgd`` plugins (``lscape.plugins.optim``) step these
same classes, so a loop using them updates exactly as an ``lscape run --plugin sam`` does.
"""

from ._base import WrappedOptimizer, batchnorm_parameters, batchnorm_stats_frozen
from .entropy_sgd import EntropySGD
from .sam import SAM, sam_edge
from .smoothout import (
    DISTRIBUTIONS,
    SCHEDULES,
    SHAPES,
    NoisyReLU,
    SmoothOut,
    ghost_closures,
    noisy_relus,
    smoothout_coefficient,
    smoothout_noise,
)

__all__ = [
    "SAM",
    "SmoothOut",
    "EntropySGD",
    "WrappedOptimizer",
    "batchnorm_stats_frozen",
    "batchnorm_parameters",
    "sam_edge",
    "smoothout_coefficient",
    "smoothout_noise",
    "ghost_closures",
    "NoisyReLU",
    "noisy_relus",
    "SCHEDULES",
    "SHAPES",
    "DISTRIBUTIONS",
]
