"""The run events, in their one order: :class:`EventDriver`.

Every loop that trains while lscape measures drives one ``EventDriver``: the engine's own
loop (``Engine._loop``), a user's loop through :class:`lscape.Session` (``lscape.attach``)
and, through a session, the Lightning and HuggingFace callbacks. The driver alone knows the
order of the hook events and the counters that go with it::

    on_run_start
      on_epoch_start                       (first step of an epoch)
        on_step_start                      (θ_t, the step's batch)
        on_after_backward                  (first backward pass of the step: .grad, loss)
        on_evaluate                        (when the step evaluates)
        on_step_end                        (θ_{t+1})
      on_epoch_end                         (after the epoch's last step)
    on_exception                           (a failure, before on_run_end)
    on_run_end

A hook implementation that raises becomes a :class:`lscape.errors.PluginError` naming its
plugin (:func:`call_hook`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import pluggy

from .context import RunContext, StepState
from .errors import DivergedError, PluginError, UsageError

__all__ = ["EventDriver", "Interrupted", "call_hook"]


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM (SIGINT raises ``KeyboardInterrupt``)."""


class EventDriver:
    """Fires the run events of one run in order and counts steps and epochs.

    ``step`` is the number of updates done (``StepState.step`` of the next step), ``epoch``
    the epoch of the current (or last) step, ``position`` the steps done in the current
    epoch; ``state`` is the open step (between :meth:`begin_step` and :meth:`end_step`),
    ``last`` the step that ended last. ``on_new_epoch(epoch)``, if given, runs when an epoch
    starts, before ``on_epoch_start`` (the engine applies its ``--regime`` there).
    """

    def __init__(self, pm: pluggy.PluginManager, ctx: RunContext,
                 on_new_epoch: Callable[[int], None] | None = None):
        self.hook = pm.hook
        self.ctx = ctx
        self.on_new_epoch = on_new_epoch
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.epoch_open = False
        self.state: StepState | None = None
        self.last: StepState | None = None
        self._epoch_ended = False  # the last epoch ended: the next step starts epoch + 1
        self._backward_fired = False

    # -- counters ------------------------------------------------------------------------

    @property
    def next_epoch(self) -> int:
        """The epoch the next step belongs to when nobody says otherwise (a user's loop)."""
        return self.epoch + 1 if self._epoch_ended else self.epoch

    def restore(self, step: int, epoch: int, epoch_open: bool, position: int = 0) -> None:
        """Continue counting from a checkpoint: ``step`` updates done, in ``epoch`` (open:
        the next step continues it; else the next step starts epoch ``epoch``)."""
        self.step, self.epoch, self.position = int(step), int(epoch), int(position)
        self.epoch_open, self._epoch_ended = bool(epoch_open), False

    # -- the events ----------------------------------------------------------------------

    def fire(self, hook: Any, **kwargs: Any) -> Any:
        """Fire one hook with ``ctx`` (see :func:`call_hook`)."""
        return call_hook(hook, ctx=self.ctx, **kwargs)

    def run_start(self) -> None:
        self.fire(self.hook.on_run_start)

    def begin_step(self, make_state: Callable[[int], StepState], epoch: int | None = None) -> StepState:
        """Start a step of ``epoch`` (default :attr:`next_epoch`): ``on_epoch_start`` if it
        starts an epoch, then ``make_state(epoch)`` (built after the epoch started, so the
        learning rate it reads is the epoch's), then ``on_step_start``."""
        if self.state is not None:
            raise UsageError("a step is still open: call session.step_end() after session.after_backward()")
        epoch = self.next_epoch if epoch is None else int(epoch)
        if not self.epoch_open or epoch != self.epoch:
            self.epoch, self.epoch_open, self._epoch_ended, self.position = epoch, True, False, 0
            if self.on_new_epoch is not None:
                self.on_new_epoch(epoch)
            self.fire(self.hook.on_epoch_start, epoch=epoch)
        state = make_state(epoch)
        self.state, self._backward_fired = state, False
        self.fire(self.hook.on_step_start, state=state)
        return state

    def after_backward(self, loss: Any) -> None:
        """The step's first backward pass is done: ``state.loss`` is ``loss`` and
        ``on_after_backward`` fires (later passes of the same step fire nothing)."""
        state = self.state
        if state is None or self._backward_fired:
            return
        self._backward_fired = True
        state.loss = loss
        self.fire(self.hook.on_after_backward, state=state)

    def evaluate(self, metrics: Mapping[str, float]) -> StepState:
        """``on_evaluate`` with ``metrics``, which join the open step's ``extras`` (after a
        step: the last step's; before any: a state of the next step); returns that state."""
        state = self.state or self.last or StepState(step=self.step, epoch=self.next_epoch,
                                                     time=time.time() - self.ctx.start_time)
        metrics = dict(metrics)
        state.extras.update(metrics)
        self.fire(self.hook.on_evaluate, state=state, metrics=metrics)
        return state

    def end_step(self) -> StepState:
        """``on_step_end`` (θ_{t+1}), count the update and, if ``state.epoch_end``, end the
        epoch (``on_epoch_end``); returns the step's state."""
        state = self.state
        if state is None:
            raise UsageError("session.step_end() without a step: call session.after_backward(batch, loss) first")
        self.fire(self.hook.on_step_end, state=state)
        self.state, self.last = None, state
        self.step += 1
        self.position += 1
        if state.epoch_end:
            self.end_epoch()
        return state

    def end_epoch(self) -> None:
        """``on_epoch_end`` of the open epoch (nothing when none is open)."""
        if not self.epoch_open:
            return
        self.fire(self.hook.on_epoch_end, epoch=self.epoch)
        self.epoch_open, self._epoch_ended, self.position = False, True, 0

    def exception(self, error: BaseException) -> None:
        """``on_exception``; a plugin failing in it does not hide the first error."""
        try:
            self.fire(self.hook.on_exception, error=error)
        except Exception:
            pass

    def run_end(self, status: str) -> None:
        self.fire(self.hook.on_run_end, status=status)


def call_hook(hook: Any, **kwargs: Any) -> Any:
    """Fire a hook; an exception from a plugin becomes ``PluginError`` naming it."""
    impls = getattr(hook, "get_hookimpls", None)
    if impls is not None and not impls():  # the per-step path skips events nobody listens to
        return None
    try:
        return hook(**kwargs)
    except (PluginError, DivergedError, KeyboardInterrupt, Interrupted):
        raise
    except Exception as e:
        raise PluginError(culprit(hook, e), e) from e


def culprit(hook: Any, error: BaseException) -> str:
    """The plugin whose hook implementation raised, found from the traceback.

    Probe instances share their base class's hook code, so a frame matches an
    implementation only if its ``self`` is that implementation's plugin object.
    """
    impls = list(getattr(hook, "get_hookimpls", lambda: [])())
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        for impl in impls:
            fn = impl.function
            code = getattr(fn, "__func__", fn).__code__
            owner = getattr(fn, "__self__", None)
            if frame.f_code is code and (owner is None or frame.f_locals.get("self") is owner):
                return impl.plugin_name.removeprefix("plugin:")
        tb = tb.tb_next
    return getattr(hook, "name", "unknown")
