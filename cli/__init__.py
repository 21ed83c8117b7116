"""The `lscape` command line: a thin click layer over the engine and the run store."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from lscape import __version__
from lscape.errors import LscapeError, PluginError, Terminated, UsageError, did_you_mean

__all__ = ["cli", "main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="lscape")
def cli() -> None:
    """Measure the loss landscape and training dynamics of PyTorch models.

    \b
    lscape run                       the default experiment (MLP on digits, SGD)
    lscape run --plugin sharpness    add a probe
    lscape plugins                   what is installed
    lscape show RUN / lscape plot RUN
    """


def _complete_plugins(incomplete: str) -> list[str]:
    """Plugin names for shell completion (see the README: `eval "$(_LSCAPE_COMPLETE=bash_source lscape)"`)."""
    from lscape.manager import build_registry, get_plugin_manager

    try:
        names = build_registry(get_plugin_manager()).activatable()
    except LscapeError:
        return []
    return sorted(n for n in names if n.startswith(incomplete))


def _run_options(*names: str, measuring: bool = False):
    """The click options of the run options ``names`` (all with a flag when none are named),
    made from the one table (``lscape.config.RunConfig``): flag, help, default shown.
    A value given on the command line arrives checked and typed, in the option's own
    name (``--model-opt`` → ``model_opts``); one not given arrives as None. ``measuring``:
    the default is the measured run's (a fresh model: the table's)."""
    from lscape.config import run_options
    from lscape.options import CLI

    table = run_options()
    chosen = [table[n] for n in names] if names else [o for o in table.values() if o.cli is not None]

    def given(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            return None
        opt = table[param.name]
        return opt.check(opt.cli.convert(value) if opt.cli.convert else value, CLI)

    def decorate(command):
        for opt in reversed(chosen):
            flag = opt.cli
            shown: Any = flag.default_text or True
            if measuring:
                shown = "the run's" if flag.multiple else f"the run's; a fresh model: {flag.default_text or opt.default}"
            kw: dict[str, Any] = {"help": opt.help, "callback": given, "show_default": shown}
            if flag.multiple:
                kw.update(multiple=True, metavar=flag.metavar)
            elif flag.is_flag:
                kw.update(is_flag=True, default=opt.default)
            else:
                kw.update(default=None if measuring else opt.default,
                          metavar=flag.metavar or getattr(opt.type, "metavar", None),
                          type=click.Choice(opt.choices) if opt.choices else str)
            if opt.name == "plugins":
                kw["shell_complete"] = lambda ctx, param, incomplete: _complete_plugins(incomplete)
            command = click.option(opt.flag, opt.name, **kw)(command)
        return command

    return decorate


@cli.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML experiment file")
@_run_options()
@click.option("--trust-store", is_flag=True, help="with --resume: import the module:factory code the store names")
def run(config_path, trust_store, **given):
    """Train a model and record what the active plugins measure."""
    from lscape.config import RunConfig, load_toml, run_options
    from lscape.engine import Engine
    from lscape.resume import EXTENDABLE
    from lscape.options import CLI

    given = {k: v for k, v in given.items() if v is not None}
    if "resume" in given:
        kept = {k: given.pop(k) for k in ("resume", "progress", *EXTENDABLE) if k in given}
        extra = [run_options()[k].flag for k in given] + (["--config"] if config_path else [])
        if extra:
            raise UsageError("--resume continues a run with its stored configuration; only --steps, --epochs "
                             f"and --time-limit (to extend it) may be given, not {extra[0]}")
        cfg = RunConfig().merged(kept, CLI)
    else:
        base = load_toml(config_path) if config_path else RunConfig()
        if "regime" in given:
            given["regime"] = {**(base.regime or {}), **given["regime"]}
        if "plugins" in given:
            given["plugins"] = list(dict.fromkeys([*(base.plugins or []), *given["plugins"]]))
        cfg = base.merged(given, CLI)
    result = Engine(cfg, trust_store=trust_store).run()
    _echo_result(result)
    if result.status != "completed":
        _exit_stopped(130 if result.status == "interrupted" else 1)


def _exit_stopped(code: int) -> None:
    """Exit after a run or measurement that ended early, its final checkpoint written: a
    further Ctrl-C (the second of a double press, arriving while the interpreter shuts down)
    would otherwise end the process by SIGINT instead of with ``code``."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


def _echo_result(result) -> None:
    click.echo(f"run {result.status}: {result.steps} steps recorded in {result.path}")
    if result.error:
        click.echo(f"reason: {result.error}")
    click.echo(f"look at it:  lscape show {result.path}")
    click.echo(f"plot it:     lscape plot {result.path}")


@cli.command(context_settings=CONTEXT)
@click.argument("source", required=False)
@click.option("--plugin", "plugins", multiple=True, required=True, metavar="NAME", help="probe to run (repeatable)",
              shell_complete=lambda ctx, param, incomplete: _complete_plugins(incomplete))
@click.option("-o", "options", multiple=True, metavar="PLUGIN.KEY=VALUE", help="plugin option (repeatable)")
@click.option("--checkpoints", default="latest", show_default=True, help="latest, all, or steps like 100,200")
@_run_options("model", "model_opts", "data", "data_opts", "loss", "batch_size", "seed", "data_seed", "device",
              measuring=True)
@click.option("--out", help="store for the measurements  [default: runs/SOURCE-measure-TIME.zarr]")
@click.option("--no-progress", is_flag=True, help="print no progress (the probe being measured and its work)")
@click.option("--trust-store", is_flag=True, help="import the module:factory code a SOURCE store names")
def measure(source, plugins, options, checkpoints, out, no_progress, trust_store, **given):
    """Run probes once on a saved model (a run's checkpoints, a .pt state dict), no training.

    SOURCE is a run store or a .pt file; without it a freshly initialised model is measured.
    """
    from contextlib import nullcontext

    from lscape.api import measure as do_measure
    from lscape.config import plugin_option_items
    from lscape.plugins.basics.progress import MeasureProgress

    overrides = {k: v for k, v in given.items() if v is not None}
    with nullcontext() if no_progress else MeasureProgress():
        result = do_measure(source, plugins, plugin_options=plugin_option_items(options), out=out,
                            checkpoints=checkpoints, trust_store=trust_store, **overrides)
    if result.status == "interrupted":
        click.echo(f"interrupted: what was measured is in {result.path}", err=True)
        _exit_stopped(130)
    click.echo(f"measured {result.steps} model state(s) into {result.path}")
    click.echo(f"look at it:  lscape show {result.path}")


@cli.command(context_settings=CONTEXT)
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(name, as_json):
    """List installed plugins; with NAME, its options, outputs and schedule."""
    from rich.table import Table

    from lscape.manager import build_registry, get_plugin_manager, source_version

    pm = get_plugin_manager()
    reg = build_registry(pm)
    console = _console()
    if name:
        entry = reg.activatable().get(name)
        if entry is None:
            raise UsageError(f"unknown plugin '{name}'{did_you_mean(name, reg.activatable())} (see `lscape plugins`)")
        info = entry.obj.describe()
        info["source"] = entry.source
        if as_json:
            click.echo(json.dumps(info, indent=2, default=str))
            return
        console.print(f"{info['name']} ({info['kind']}, from {entry.source})\n{info['help']}", markup=False)
        if getattr(entry.obj, "schedule", None) and info["kind"] == "probe":
            console.print(f"default schedule: {entry.obj.schedule}; data: {entry.obj.data}")
        if info.get("cost"):
            console.print(f"cost model: {info['cost']}", markup=False)
        table = Table("option", "type", "default", "help", title="options (-o NAME.KEY=VALUE)")
        for o in info["options"]:
            extra = f" (one of {', '.join(map(str, o['choices']))})" if o["choices"] else ""
            table.add_row(*_cells(o["name"], o["type"], repr(o["default"]), o["help"] + extra))
        console.print(table)
        if info["outputs"]:
            table = Table("array", "dims", "dtype", "meaning", title=f"outputs (group '{entry.obj.group_name or name}')")
            for o in info["outputs"]:
                table.add_row(*_cells(o["name"], "(" + ", ".join(o["dims"]) + ")", o["dtype"], o["long_name"] or o["units"]))
            console.print(table)
        return
    listing = {
        "plugins": {n: {"kind": e.obj.kind(), "source": e.source, "help": e.help,
                        "always_on": bool(getattr(e.obj, "always_on", False))}
                    for n, e in sorted(reg.activatable().items())},
        "models": {n: e.help for n, e in sorted(reg.models.items())},
        "datasets": {n: e.help for n, e in sorted(reg.datasets.items())},
        "losses": {n: e.help for n, e in sorted(reg.losses.items())},
        "optimizers": {n: e.help for n, e in sorted(reg.optimizers.items())},
        "modules": {n: {"version": source_version(pm, n),
                        "hooks": sorted(h.name for h in pm.get_hookcallers(p) or [])}
                    for n, p in pm.list_name_plugin()},
    }
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    # below 120 columns the source module (shown by `lscape plugins NAME`) gives its room to the help
    wide = console.width >= 120
    table = Table(title="plugins (--plugin NAME)")
    table.add_column("plugin", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    if wide:
        table.add_column("from", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("what it does", ratio=1)
    for n, e in listing["plugins"].items():
        kind = e["kind"] + (" (always on)" if e["always_on"] else "")
        table.add_row(*_cells(n, kind, *([e["source"]] if wide else []), e["help"]))
    console.print(table)
    table = Table("module", "version", "hooks", title="plugin modules")
    for n, m in listing["modules"].items():
        table.add_row(*_cells(n, m["version"], ", ".join(m["hooks"])))
    console.print(table)
    for kind in ("models", "datasets", "losses", "optimizers"):
        table = Table({"losses": "loss"}.get(kind, kind[:-1]), "what it is", title=kind)
        for n, h in listing[kind].items():
            table.add_row(*_cells(n, h))
        console.print(table)


def _console():
    from rich.console import Console

    # no emoji codes (":A:" in "log:A:B:N" is not an emoji) and no markup from plugin text
    return Console(emoji=False, highlight=False)


def _cells(*values: Any) -> list[Any]:
    from rich.text import Text

    return [Text(str(v)) for v in values]


@cli.command(context_settings=CONTEXT)
@click.argument("run_path", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (numbers as numbers, null for NaN)")
def show(run_path, as_json):
    """What a run store holds: status, steps done/total, groups, arrays with their last finite
    values, and a summary per series (first, last, min, max, mean over the last 10%)."""
    from rich.table import Table

    from lscape.display import config_line, format_value, run_summary, steps_text
    from lscape.store import RunReader

    reader = RunReader(run_path)
    summary = run_summary(reader)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str, allow_nan=False))
        return
    console = _console()
    cfg = summary.get("config") or {}
    console.print(f"[bold]{reader.path}[/]  status: [bold]{summary['status']}[/]  "
                  f"steps: {steps_text(summary)}  lscape {summary['lscape_version']}", highlight=False)
    if summary.get("error"):
        console.print(f"error: {summary['error']}", markup=False)
    if reader.attrs.get("kind") == "measure":
        console.print(f"measurements (lscape measure) of {reader.attrs.get('source') or 'a fresh model'}", markup=False)
    console.print(config_line(cfg), markup=False)
    for ext in summary.get("extensions") or []:
        changed = ", ".join(f"{k} {ext['from'].get(k)} -> {v}" for k, v in ext.items()
                            if k not in ("from", "at_step", "time"))
        console.print(f"extended at step {ext.get('at_step')}: {changed}", markup=False)
    table = Table("group", "array", "shape", "dtype", "last value", "at step")
    for g, arrays in summary["groups"].items():
        for i, (name, info) in enumerate(arrays.items()):
            at = "" if info["last_step"] is None else str(info["last_step"])
            table.add_row(*_cells(g if i == 0 else "", name, "×".join(map(str, info["shape"])), info["dtype"],
                                  format_value(info["last"]), at))
    console.print(table)
    lines = []
    for g, arrays in summary["groups"].items():
        series = {name: info["summary"] for name, info in arrays.items() if info.get("summary") and name != "lr"}
        chosen = sorted(series, key=lambda n: (_PRIMARY.index(n) if n in _PRIMARY else len(_PRIMARY), n))[:3]
        if chosen:
            lines.append(f"{g}: " + "; ".join(f"{n} {_span(series[n])}" for n in chosen))
    if lines:
        console.print("summary: first -> last [min, max], late = mean of the last 10%  (all: --json)", markup=False)
        for line in lines:
            console.print("  " + line, markup=False, soft_wrap=True)
    budget = reader.attrs.get("probe_budget")
    if budget is not None:
        overhead = reader.attrs.get("probe_overhead")
        fired, skipped = reader.attrs.get("probe_fired") or {}, reader.attrs.get("probe_skipped") or {}
        counts = ", ".join(f"{name} {fired.get(name, 0)} measured, {skipped.get(name, 0)} skipped"
                           for name in sorted(set(fired) | set(skipped)))
        console.print(f"probe budget {budget:g}: realised overhead "
                      f"{'n/a' if overhead is None else format(overhead, '.3g')} of training time"
                      f"{' (' + counts + ')' if counts else ''}", markup=False, soft_wrap=True)
    ckpt = summary.get("latest_checkpoint")
    if ckpt:
        console.print(f"checkpoints: {ckpt['count']}; \"latest\" (what `lscape measure RUN` measures) is step "
                      f"{ckpt['step']} ({ckpt['name']})", markup=False, soft_wrap=True)
    else:
        console.print("checkpoints: none", markup=False)


#: the series a group's one-line summary shows first
_PRIMARY = ("loss", "eval_loss", "eval_accuracy", "lambda_max", "trace", "grad_norm", "b_simple", "noise_sq",
            "sharpness", "gsnr")


def _span(s: dict[str, Any]) -> str:
    g = lambda v: f"{v:.4g}"  # noqa: E731
    if s["n"] == 1:
        return f"{g(s['last'])} (1 value)"
    return f"{g(s['first'])} -> {g(s['last'])} [{g(s['min'])}, {g(s['max'])}] late {g(s['late_mean'])}"


@cli.command(context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--since", type=str, metavar="STEP", help="late-phase window: rows with step >= STEP  "
              "[default: the last 10% of each run]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def compare(runs, since, as_json):
    """Late-phase statistics of several runs side by side: median λ_max/(2/η) and λ/SAM-edge
    (eos or sharpness probes), final train loss (mean over the window), last eval loss and
    accuracy."""
    from rich.table import Table

    from lscape.display import compare_row, loss_match_warnings
    from lscape.store import RunReader

    start = None
    if since is not None:
        try:
            start = int(since)
        except ValueError:
            raise UsageError(f"--since must be a step number, got '{since}'") from None
        if start < 0:
            raise UsageError(f"--since must be a step number >= 0, got {start}")
    readers = [RunReader(r) for r in runs]
    rows = [compare_row(r, start) for r in readers]
    for warning in loss_match_warnings(rows):
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2, allow_nan=False))
        return
    columns = [("run", "run"), ("status", "status"), ("steps", "steps"),
               ("lambda_max", "λ_max"), ("lambda_over_threshold_gd", "λ_max/(2/η)"),
               ("lambda_over_sam_edge", "λ/SAM-edge"), ("train_loss", "train loss"), ("eval_loss", "eval loss"),
               ("eval_accuracy", "eval acc")]
    window = f"step >= {start}" if start is not None else "the last 10% of each quantity's measurements"
    table = Table(*(title for _, title in columns), title=f"late phase: medians (means for the loss) over {window}")
    for row in rows:
        table.add_row(*_cells(*(_fmt(row.get(key)) for key, _ in columns)))
    from rich.console import Console

    Console(emoji=False, highlight=False, width=max(160, _console().width)).print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@cli.command(context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--out", "out_dir", help="folder for the figures  [default: RUN-plots next to the run; A-vs-B-plots for several]")
@click.option("--format", "fmt", type=click.Choice(["png", "pdf", "svg"]), default="png", show_default=True,
              help="file format of the figures")
@click.option("--dpi", type=click.IntRange(10, 2400), default=110, show_default=True, help="resolution (png)")
@click.option("--smooth", type=click.IntRange(1, None), default=None, metavar="K",
              help="moving average over K measurements on every series (raw data drawn faint)")
def plot(runs, out_dir, fmt, dpi, smooth):
    """Figures for every plugin that recorded data; several runs are overlaid, one colour each."""
    from lscape.manager import build_registry, get_plugin_manager
    from lscape.plotting import configure, default_plot_folder, plot_runs, require_writable_folder
    from lscape.store import RunReader

    readers = [RunReader(r) for r in runs]
    out = Path(out_dir) if out_dir is not None else default_plot_folder([r.path for r in readers])
    require_writable_folder(out)
    with configure(format=fmt, dpi=dpi, smooth=smooth):
        written, warnings = plot_runs(readers, out, build_registry(get_plugin_manager()))
    for message in warnings:
        click.echo(f"warning: {message}", err=True)
    for r in readers:  # a run that failed before recording anything is named, not silently left out
        if not [g for g in r.groups() if g != "checkpoints"]:
            click.echo(f"{r.path} ({r.attrs.get('status')}): nothing recorded, not drawn", err=True)
    if not written:
        click.echo("no figures: the runs hold no data that a plot is registered for")
        return
    for p in written:
        click.echo(str(p))


def _add_plugin_commands() -> None:
    try:
        from lscape.manager import get_plugin_manager

        get_plugin_manager().hook.register_commands(cli=cli)
    except LscapeError as e:
        click.echo(_one_line(f"error: {e}"), err=True)
        sys.exit(2)


def _one_line(message: object) -> str:
    """``message`` on one line: line breaks and other control characters (which a user's
    own text, echoed back in an error, may hold) are shown escaped."""
    text = str(message)
    if len(text.splitlines()) <= 1 and text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI, turning bad input into one line and exit status 2."""
    from lscape.errors import restore_interrupt

    _add_plugin_commands()
    restore_interrupt()  # imports done: Ctrl-C is KeyboardInterrupt again (handled below, and by the engine)
    try:
        cli.main(args=argv, prog_name="lscape", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see `{e.ctx.command_path} --help`)"
        click.echo(_one_line(f"error: {e.format_message()}{hint}"), err=True)
        sys.exit(2)
    except UsageError as e:
        click.echo(_one_line(f"error: {e}"), err=True)
        if os.environ.get("LSCAPE_DEBUG") and e.__cause__ is not None:  # user code that raised
            traceback.print_exception(e.__cause__)
        sys.exit(2)
    except PluginError as e:
        click.echo(_one_line(f"error: {e}"), err=True)
        if os.environ.get("LSCAPE_DEBUG"):
            traceback.print_exception(e.error)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Terminated:  # SIGTERM while starting
        click.echo("terminated", err=True)
        sys.exit(130)
    except Exception as e:
        click.echo(_one_line(f"error: {type(e).__name__}: {e} (set LSCAPE_DEBUG=1 for the traceback)"), err=True)
        if os.environ.get("LSCAPE_DEBUG"):
            traceback.print_exc()
        sys.exit(1)
