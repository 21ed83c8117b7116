"""Every hook a lscape plugin can implement, grouped by when it is called.

Implementations take only the arguments they name (pluggy passes the rest by keyword), so
new arguments never break old plugins. Never give a hook implementation's argument a
default value: pluggy then does not pass it. The annotations say what each argument is
(``Register`` is the ``register`` callback a registration hook receives); every hook returns
nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from .context import RunContext, StepState

hookspec = pluggy.HookspecMarker("lscape")
hookimpl = pluggy.HookimplMarker("lscape")

#: the callback a registration hook receives: ``register(name, obj, help="")`` or ``register(cls)``
Register = Callable[..., None]

# ---------------------------------------------------------------------------------------
# Registration hooks: called once, when the plugin manager is built, on every loaded
# plugin module (built-in, entry point or import path). Each receives a ``register``
# callback; the core keeps the collection.
# ---------------------------------------------------------------------------------------


@hookspec
def register_models(register: Register) -> None:
    """Register model factories.

    :param register: ``register(name, factory, help="")``. ``factory(**options)`` returns
        an ``nn.Module``; it receives the ``--model-opt`` key=values as keyword arguments,
        plus ``num_classes`` and ``input_shape`` when the data set declares them and the
        factory accepts them.
    :returns: nothing.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register data set factories.

    :param register: ``register(name, factory, help="")``. ``factory(**options)`` returns a
        ``torch.utils.data.Dataset`` or a dict ``{"train": Dataset, "eval": Dataset}``;
        it receives the ``--data-opt`` key=values and ``seed``/``root`` if it accepts them.
    :returns: nothing.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register loss functions.

    :param register: ``register(name, fn, help="")`` with ``fn(output, target)`` returning
        the mean loss over the batch, or a class whose instances are such callables.
    :returns: nothing.
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register base optimizers (subclasses of ``torch.optim.Optimizer``).

    :param register: ``register(name, factory, help="")`` with
        ``factory(params, lr, momentum, weight_decay, **options)`` returning an optimizer.
    :returns: nothing.
    """


@hookspec
def register_step_owners(register: Register) -> None:
    """Register optimizer variants that own the training step (SAM, Entropy-SGD, ...).

    :param register: ``register(cls)`` with ``cls`` a subclass of ``lscape.StepOwner``.
        At most one step owner may be active in a run.
    :returns: nothing.
    """


@hookspec
def register_probes(register: Register) -> None:
    """Register measurement plugins.

    :param register: ``register(cls)`` with ``cls`` a subclass of ``lscape.Probe``; it is
        instantiated (with its resolved options) only when activated with ``--plugin``.
    :returns: nothing.
    """


@hookspec
def register_plugins(register: Register) -> None:
    """Register run plugins that are neither probes nor step owners (training metrics,
    progress display, analyses that read other plugins' data).

    :param register: ``register(cls)`` with ``cls`` a subclass of ``lscape.Plugin``;
        instantiated only when active (``--plugin NAME``, or ``always_on``).
    :returns: nothing.
    """


@hookspec
def register_plots(register: Register) -> None:
    """Register figure makers for ``lscape plot``.

    :param register: ``register(group, fn)``: ``fn(runs, out_dir)`` is called with the list
        of ``lscape.store.RunReader`` that hold ``group`` and a ``pathlib.Path`` to write
        into; it returns the list of files it wrote.
    :returns: nothing.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``lscape`` command line.

    :param cli: the top-level ``click.Group``; call ``cli.command()`` or
        ``cli.add_command(...)``.
    :returns: nothing.
    """


@hookspec
def register_curvature_operators(register):
    """Register curvature matrices: each becomes a ``kind`` of every curvature probe and of
    ``lscape.curvature.HessianOperator``.

    :param register: ``register(name, cls)`` with ``cls`` a subclass of
        ``lscape.curvature.CurvatureOperator`` (``lscape.curvature.register_operator``).
    :returns: nothing.
    """


# ---------------------------------------------------------------------------------------
# Run events: fired by the engine (and lscape.attach), in this order
# (lscape.events.EventDriver), on active plugins only. ``ctx`` is the
# ``lscape.RunContext`` (model, data, loss, optimizer, store, config, device); ``state``
# the ``lscape.StepState`` of the current step (step, epoch, batch, loss, lr).
# ---------------------------------------------------------------------------------------


@hookspec
def on_run_start(ctx: RunContext) -> None:
    """After model, data, optimizer and store are built, before the first step.

    :param ctx: the run context.
    """


@hookspec
def on_epoch_start(ctx: RunContext, epoch: int) -> None:
    """Before the first step of an epoch.

    :param ctx: the run context.
    :param epoch: 0-based epoch index.
    """


@hookspec
def on_step_start(ctx: RunContext, state: StepState) -> None:
    """Before the forward pass of a training step; ``state.batch`` is the minibatch.

    :param ctx: the run context.
    :param state: the step state; ``state.step`` is the number of updates done so far.
    """


@hookspec
def on_after_backward(ctx: RunContext, state: StepState) -> None:
    """After the first backward pass of a step, before the update: ``.grad`` holds
    ∇L_B(θ_step) on ``state.batch`` and ``state.loss`` the loss at θ_step.

    :param ctx: the run context.
    :param state: the step state.
    """


@hookspec
def on_step_end(ctx: RunContext, state: StepState) -> None:
    """After the optimizer update; ``state.step`` is still the index of the step just
    taken, the parameters are θ_{step+1}.

    :param ctx: the run context.
    :param state: the step state.
    """


@hookspec
def on_epoch_end(ctx: RunContext, epoch: int) -> None:
    """After the last step of an epoch.

    :param ctx: the run context.
    :param epoch: 0-based epoch index.
    """


@hookspec
def on_evaluate(ctx: RunContext, state: StepState, metrics: dict[str, float]) -> None:
    """After the engine evaluated the model on held-out data.

    :param ctx: the run context.
    :param state: the step state at which the evaluation ran.
    :param metrics: dict with ``eval_loss`` and, for classification, ``eval_accuracy``.
    """


@hookspec
def on_run_end(ctx: RunContext, status: str) -> None:
    """Once, when the run stops for any reason, before the store's final flush.

    :param ctx: the run context.
    :param status: ``"completed"``, ``"failed"``, ``"interrupted"`` or ``"diverged"``.
    """


@hookspec
def on_exception(ctx: RunContext, error: BaseException) -> None:
    """When a run fails with an exception (before ``on_run_end``).

    :param ctx: the run context.
    :param error: the exception.
    """

