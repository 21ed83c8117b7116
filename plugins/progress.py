"""Always-on: rich progress (loss, eval metrics, steps/s, ETA), or plain log lines when the
output is not a terminal or with `--no-progress`."""

from __future__ import annotations

import sys
import time

from lscape import Option, Plugin, hookimpl


class Progress(Plugin):
    """Shows training progress on stderr; switch off with `--disable progress`."""

    name = "progress"
    always_on = True
    options = (Option("log_every", float, 10.0, "seconds between plain log lines", minimum=0.0),)

    def __init__(self, **options):
        super().__init__(**options)
        self._bar = None
        self._task = None
        self._last_log = 0.0
        self._metrics: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._step0: int | None = None

    @hookimpl
    def on_run_start(self, ctx):
        if not ctx.is_main:
            return
        self._t0 = time.monotonic()
        self._last_log = self._t0
        fancy = ctx.config.progress and sys.stderr.isatty()
        total = ctx.total_steps
        if fancy:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(
                TextColumn("[bold]lscape[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), transient=False, refresh_per_second=4,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, info="")
        else:
            limit = f"{total} steps" if total else (f"time limit {ctx.config.time_limit:g}s"
                                                    if ctx.config.time_limit is not None else "no set length")
            _log(f"training {ctx.config.model} on {ctx.config.data}: {limit} -> {ctx.store.path}")

    @hookimpl
    def on_evaluate(self, metrics):
        self._metrics.update(metrics)

    @hookimpl
    def on_step_end(self, ctx, state):
        if not ctx.is_main:
            return
        if self._step0 is None:  # the first step this process runs (later than 0 on resume)
            self._step0 = state.step
        now = time.monotonic()
        if self._bar is not None:
            # formatting every step would cost more than the display gains: 10 updates/s
            last = ctx.total_steps is not None and state.step + 1 == ctx.total_steps
            if now - self._last_log >= 0.1 or last:
                self._last_log = now
                self._bar.update(self._task, completed=state.step + 1, info=self._info(state, now))
        elif now - self._last_log >= self.opts.log_every or (ctx.total_steps and state.step + 1 == ctx.total_steps):
            self._last_log = now
            total = f"/{ctx.total_steps}" if ctx.total_steps else ""
            _log(f"step {state.step + 1}{total}  epoch {state.epoch}  {self._info(state, now)}")

    @hookimpl
    def on_run_end(self, ctx, status):
        if not ctx.is_main:
            return
        if self._bar is not None:
            self._bar.stop()
        _log(f"run {status} after {time.monotonic() - self._t0:.1f}s")

    def _info(self, state, now):
        rate = (state.step + 1 - self._step0) / max(now - self._t0, 1e-9)
        parts = [f"loss {state.loss:.4g}" if state.loss is not None else "loss -"]
        parts += [f"{k.replace('eval_', 'eval ')} {v:.4g}" for k, v in self._metrics.items()]
        parts.append(f"{rate:.1f} steps/s")
        return "  ".join(parts)


def _log(message: str) -> None:
    print(f"[lscape] {message}", file=sys.stderr, flush=True)


@hookimpl
def register_plugins(register):
    register(Progress)
