"""Always-on: rich progress (loss, eval metrics, steps/s, ETA, the probe being measured and
how far it is), or plain log lines with an ETA when stderr is not a terminal. A run with
``progress = false`` (``--no-progress``, ``lscape.run(progress=False)``) prints nothing."""

from __future__ import annotations

import sys
import time

from lscape import Option, Plugin, activity, hookimpl


class Progress(Plugin):
    """Shows training progress on stderr; switch off with `--disable progress`."""

    name = "progress"
    sharded = True  # tried under --strategy fsdp (tests/test_sharded.py)
    always_on = True
    options = (Option("log_every", float, 10.0, "seconds between plain log lines", minimum=0.0),)

    def __init__(self, **options):
        super().__init__(**options)
        self._bar = None
        self._task = None
        self._last_log = 0.0
        self._last_activity = 0.0
        self._metrics: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._step0: int | None = None
        self._step = 0
        self._total: int | None = None
        self._time_limit: float | None = None
        self._stop_listening = None
        self._quiet = False
        self._doing_step = 0

    @hookimpl
    def on_run_start(self, ctx):
        if not ctx.is_main:
            return
        if not ctx.config.progress:
            self._quiet = True
            return
        self._t0 = time.monotonic()
        self._last_log = self._t0
        self._total = total = ctx.total_steps
        self._time_limit = ctx.config.time_limit
        self._step = self._step0 = None
        if sys.stderr.isatty():
            self._bar = progress_bar()
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, info="")
        else:
            limit = f"{total} steps" if total else (f"time limit {ctx.config.time_limit:g}s"
                                                    if ctx.config.time_limit is not None else "no set length")
            _log(f"training {_short(ctx.config.model)} on {_short(ctx.config.data)}: {limit} -> {ctx.store.path}")
        self._stop_listening = activity.listen(self._on_activity)

    @hookimpl
    def on_step_start(self, state):
        self._doing_step = state.step  # probes measure inside the step, before its on_step_end

    @hookimpl
    def on_evaluate(self, metrics):
        self._metrics.update(metrics)

    @hookimpl
    def on_step_end(self, ctx, state):
        if not ctx.is_main or self._quiet:
            return
        if self._step0 is None:  # the first step this process runs (later than 0 on resume)
            self._step0 = state.step
        self._step = state.step
        now = time.monotonic()
        last = ctx.total_steps is not None and state.step + 1 == ctx.total_steps
        if self._bar is not None:
            # formatting every step would cost more than the display gains: 10 updates/s
            if now - self._last_log >= 0.1 or last:
                self._last_log = now
                self._bar.update(self._task, completed=state.step + 1, info=self._info(state, now))
        elif now - self._last_log >= self.opts.log_every or last:
            self._last_log = now
            total = f"/{ctx.total_steps}" if ctx.total_steps else ""
            eta = self._eta(state.step + 1, now)
            _log(f"step {state.step + 1}{total}  epoch {state.epoch}  {self._info(state, now)}"
                 + (f"  ETA {eta}" if eta else ""))

    @hookimpl
    def on_run_end(self, ctx, status):
        if not ctx.is_main or self._quiet or not ctx.config.progress:
            return
        if self._stop_listening is not None:
            self._stop_listening()
        if self._bar is not None:
            self._bar.stop()
        _log(f"run {status} after {time.monotonic() - self._t0:.1f}s")

    def _on_activity(self, act):
        """A probe started, advanced or finished: show it (rate-limited to 10 updates/s)."""
        now = time.monotonic()
        started = act is not None and act.done == 0
        if self._bar is not None:
            if act is None or started or now - self._last_activity >= 0.1:
                self._last_activity = now
                self._bar.doing = f"measuring {act.describe()}" if act is not None else ""
                self._bar.refresh()
        elif act is not None and now - self._last_log >= self.opts.log_every:
            # a measurement longer than log_every still gets its lines
            self._last_log = now
            step = f"step {self._doing_step + 1}{f'/{self._total}' if self._total else ''}  "
            _log(f"{step}measuring {act.describe()}")

    def _info(self, state, now):
        rate = (state.step + 1 - self._step0) / max(now - self._t0, 1e-9)
        parts = [f"loss {state.loss:.4g}" if state.loss is not None else "loss -"]
        parts += [f"{k.replace('eval_', 'eval ')} {v:.4g}" for k, v in self._metrics.items()]
        parts.append(f"{rate:.1f} steps/s")
        return "  ".join(parts)

    def _eta(self, done, now):
        """Time left as h:mm:ss, from the step rate (or the time limit), or ''."""
        elapsed = max(now - self._t0, 1e-9)
        left = None
        if self._total:
            steps = done - (self._step0 or 0)
            left = (self._total - done) * elapsed / steps if steps > 0 else None
        elif self._time_limit:
            left = max(0.0, self._time_limit - elapsed)
        if left is None:
            return ""
        left = int(round(left))
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def progress_bar(console=None):
    """The training bar: the bar, the step count and the ETA keep their room at any terminal
    width (80 columns included), the loss/metrics text is cut to what is left, and the probe
    being measured has its own line under the bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column
    from rich.text import Text

    class Bar(Progress):
        doing = ""

        def get_renderables(self):
            yield self.make_tasks_table(self.tasks)
            if self.doing:
                yield Text(self.doing, style="cyan", no_wrap=True, overflow="ellipsis")

    fixed = dict(no_wrap=True, overflow="fold")
    return Bar(
        TextColumn("[bold]lscape[/]", table_column=Column(**fixed)),
        BarColumn(bar_width=20, table_column=Column(**fixed, min_width=20)),
        MofNCompleteColumn(table_column=Column(**fixed, min_width=11)),
        TimeRemainingColumn(table_column=Column(**fixed, min_width=7)),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        transient=False, refresh_per_second=4, console=console, expand=True,
    )


class MeasureProgress:
    """What `lscape measure` shows while probes run on saved models: the probe, its units of
    work (Hessian-vector products, grid points) and time; a status line on a terminal, plain
    lines every ``log_every`` seconds otherwise."""

    def __init__(self, log_every: float = 10.0):
        self.log_every = log_every
        self._status = None
        self._last = 0.0
        self._stop = None
        self._name: str | None = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console

            self._status = Console(stderr=True, emoji=False, highlight=False).status("lscape measure")
            self._status.start()
        self._stop = activity.listen(self._update)
        return self

    def __exit__(self, *exc):
        self._stop()
        if self._status is not None:
            self._status.stop()
        return False

    def _update(self, act):
        now = time.monotonic()
        if act is None:
            return
        if self._status is not None:
            if act.done == 0 or now - self._last >= 0.1:
                self._last = now
                self._status.update(f"measuring {act.describe()}")
        elif act.name != self._name or now - self._last >= self.log_every:
            self._name, self._last = act.name, now
            _log(f"measuring {act.describe()}")


def _short(name) -> str:
    """A model or data name in a few words: an object given from Python (``<object
    pkg.mod.Class: its repr>``) by its class name."""
    text = str(name)
    if text.startswith("<object "):
        return text[len("<object "):].split(":", 1)[0].rsplit(".", 1)[-1].rstrip(">")
    return text


def _log(message: str) -> None:
    print(f"[lscape] {message}", file=sys.stderr, flush=True)


@hookimpl
def register_plugins(register):
    register(Progress)
