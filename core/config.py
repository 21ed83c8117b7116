"""The run configuration: one dataclass whose fields are the table of run options.

Every field is declared once, with ``option(...)``: its type, default, help, bounds and
command-line form. From that one table come the TOML keys (the field names; ``-`` may
stand for ``_``), the ``lscape run``/``lscape measure`` flags (``lscape.cli``), the
``lscape.run``/``make_config`` keywords and the checks. Plugin options live in
``[plugins.NAME]`` tables. The command line overrides the file.

Each value remembers where it was given, so an error names it in the caller's words:
``--momentum`` on the command line, ``momentum=`` in Python, ``exp.toml: 'momentum'`` in a
file. ``check()`` is pure (it returns the checked values, or raises ``UsageError`` with
one line); ``validate()`` is ``check()`` followed by the explicit normalisation step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError, did_you_mean
from .options import PYTHON, Flag, Option, Spelling, in_file, parse_key_values
from .schedule import Schedule, parse_duration

__all__ = ["RunConfig", "load_toml", "run_options", "LR_SCHEDULES", "PRECISIONS", "STRATEGIES"]

LR_SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
#: how torchrun's processes share the model: replicated (DDP) or sharded (FSDP2; lscape.sharding)
STRATEGIES = ("ddp", "fsdp")
_FLOAT32_MAX = 3.4028234663852886e38
#: probes active when neither the config file nor the command line names any
DEFAULT_PLUGINS = ("grad-norm",)
#: epochs used when neither epochs, steps nor a time limit is given
DEFAULT_EPOCHS = 10
#: the cap of a run that ``until_loss`` stops, when neither epochs, steps nor a time limit is given
UNTIL_LOSS_EPOCHS = 1000
#: a field's metadata key holding its Option
OPTION = "lscape.option"


# -- value parsers: raise ValueError/TypeError (``{option}`` in a message is replaced) ---

def kind(what: str, metavar: str | None = None):
    """Marks a parser with the words for a value of its kind, for the error when a value is
    not of that kind (``--lr must be a number``), and its placeholder in ``--help``."""
    def mark(parse):
        parse.what, parse.metavar = what, metavar
        return parse
    return mark


@kind("text")
def text(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


@kind("a path", "PATH")
def path(value: Any) -> str:
    out = text(value)
    if not out.strip():
        raise ValueError(value)
    return out


@kind("true or false")
def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


@kind("an integer", "N")
def integer(value: Any) -> int:
    """An int, its text, or an integral float (not a bool, not "1e3")."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


@kind("a number", "X")
def real(value: Any) -> float:
    """A float that torch can cast to the parameters' float32 without overflowing."""
    if isinstance(value, bool):
        raise TypeError(value)
    out = float(value)  # a ValueError: "must be a number"
    if math.isfinite(out) and abs(out) > _FLOAT32_MAX:
        raise ValueError(f"{{option}} must be at most {_FLOAT32_MAX:.4g} in size, got '{value}'")
    return out


@kind("a positive integer or 'full'", "N|full")
def parse_batch_size(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "full":
        return "full"
    if isinstance(value, float):  # a size is counted, not measured
        raise TypeError(value)
    return integer(value)


def parse_lr_schedule(value: Any) -> str:
    out = text(value)
    kind = out.split(":", 1)[0]
    if kind not in LR_SCHEDULES:
        raise ValueError(f"bad {{option}} '{out}': use constant, step:EPOCH,EPOCH:GAMMA or cosine")
    if kind == "step":
        try:
            parse_step_schedule(out)
        except UsageError:
            raise ValueError(f"bad {{option}} '{out}': use step:EPOCH,EPOCH:GAMMA, e.g. step:30,60:0.1") from None
    return out


@kind("a schedule", "SCHEDULE")
def schedule(value: Any) -> str:
    out = text(value)
    Schedule.parse(out)
    return out


@kind("cpu or cuda", "DEVICE")
def parse_device(value: Any) -> str:
    out = text(value)
    if out not in ("cpu", "cuda") and not out.startswith("cuda:"):
        raise ValueError(value)
    return out


def parse_precision(value: Any) -> str:
    return text(value).strip().lower()


@kind("true/false or a torch.compile backend name")
def compile_mode(value: Any) -> bool | str:
    """true/false, or the name of a registered torch.compile backend."""
    if isinstance(value, bool):
        return value
    out = text(value)
    if not out.strip() or out.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        raise ValueError(value)
    import torch

    backends = torch.compiler.list_backends(exclude_tags=())
    if out not in backends:
        raise ValueError(f"{{option}} must be true/false or a torch.compile backend name, got '{out}'"
                         f"{did_you_mean(out, backends)}")
    return out


@kind("a table of KEY = VALUE")
def table(value: Any) -> dict[str, Any]:
    """A table of KEY = VALUE (a ``dict`` with text keys)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(value)
    return dict(value)


@kind("a table of tables, one per plugin")
def tables(value: Any) -> dict[str, dict[str, Any]]:
    """One table of options per plugin."""
    out = table(value)
    for plugin, opts in out.items():
        if not isinstance(opts, Mapping) or not all(isinstance(k, str) for k in opts):
            raise UsageError(f"options of plugin '{plugin}' must be a table of KEY = VALUE")
    return {k: dict(v) for k, v in out.items()}


@kind("a list of plugin names")
def names(value: Any) -> list[str]:
    """A list of plugin names (one name alone is a list of one)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(value)
    return list(value)


@kind("a list of plugin names")
def plugin_names(value: Any) -> list[str]:
    out = names(value)
    for name in out:
        if not name.strip() or name.startswith("."):  # neither a plugin nor an importable module
            raise UsageError(f"unknown plugin '{name}' (see `lscape plugins`)")
    return out


@kind("a duration such as 30m", "DURATION")
def duration(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(value)
    return parse_duration(value)


# -- command-line forms of the options that take several values --------------------------

def plugin_option_items(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``-o sharpness.every=10`` → ``{"sharpness": {"every": "10"}}`` (the plugin parses)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        plugin, dot, name = key.partition(".")
        if not sep or not dot or not plugin or not name:
            raise UsageError(f"bad -o '{item}': expected PLUGIN.KEY=VALUE, e.g. -o sharpness.every=10")
        out.setdefault(plugin.strip(), {})[name.strip().replace("-", "_")] = value.strip()
    return out


def regime_items(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--regime 30:lr=0.01,momentum=0.9`` → ``{"30": {"lr": 0.01, "momentum": 0.9}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        epoch, sep, settings = item.partition(":")
        if not sep or not epoch.strip() or not settings.strip():
            raise UsageError(f"bad --regime '{item}': expected EPOCH:KEY=VALUE[,KEY=VALUE], e.g. 30:lr=0.01")
        out.setdefault(epoch.strip(), {}).update(parse_key_values(tuple(settings.split(",")), "--regime"))
    return out


def _key_values(flag_name: str):
    return lambda items: parse_key_values(items, flag_name)


def option(default: Any, help: str, type: Any = text, *, cli: Flag | None = Flag(), **kw: Any) -> Any:
    """A ``RunConfig`` field: the default, and the ``Option`` that describes it."""
    opt = Option("", type=type, default=default, help=help, cli=cli, **kw)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.copy(default), metadata={OPTION: opt})
    return field(default=default, metadata={OPTION: opt})


@dataclass
class RunConfig:
    """Everything that defines a run. Defaults are the built-in default experiment.

    Each field is one run option (``run_options()`` lists them as ``Option``s)."""

    model: str = option("mlp", "registered name or module:factory")
    model_opts: dict[str, Any] = option(
        {}, "model option (repeatable)", table,
        cli=Flag("--model-opt", metavar="K=V", multiple=True, convert=_key_values("--model-opt")))
    data: str = option("digits", "registered name or module:factory")
    data_opts: dict[str, Any] = option(
        {}, "data option (repeatable)", table,
        cli=Flag("--data-opt", metavar="K=V", multiple=True, convert=_key_values("--data-opt")))
    loss: str = option("ce", "ce, mse or module:fn")
    optimizer: str = option("sgd", "sgd, adam, adamw or module:Class")
    optimizer_opts: dict[str, Any] = option(
        {}, "optimizer option (repeatable)", table,
        cli=Flag("--optimizer-opt", metavar="K=V", multiple=True, convert=_key_values("--optimizer-opt")))
    lr: float = option(0.1, "learning rate", real, within="(0, inf)", what="a positive finite number")
    momentum: float = option(0.0, "momentum", real, within="[0, 1)")
    weight_decay: float = option(0.0, "weight decay", real, within="[0, inf)", what=">= 0 (a finite number)")
    nesterov: bool = option(False, "Nesterov momentum (sgd)", flag, what="true or false", cli=Flag(is_flag=True))
    batch_size: int | str = option(64, "N or 'full' (gradient descent)", parse_batch_size, within="[1, inf)",
                                   what="a positive integer or 'full'")
    epochs: int | None = option(None, "number of epochs", integer, within="[1, inf)", what="a positive integer",
                                cli=Flag(default_text=f"{DEFAULT_EPOCHS} without --steps or --time-limit; "
                                                              f"{UNTIL_LOSS_EPOCHS} with --until-loss"))
    steps: int | None = option(None, "number of steps (instead of epochs)", integer, within="[1, inf)",
                               what="a positive integer")
    time_limit: float | None = option(None, "stop after this wall time, e.g. 30m", duration)
    lr_schedule: str = option("constant", "constant, step:30,60:0.1 or cosine", parse_lr_schedule)
    regime: dict[str, dict[str, float]] | None = option(
        None, "from EPOCH on set lr/momentum/weight_decay, e.g. 30:lr=0.01 (repeatable)", lambda v: _regime(v),
        cli=Flag(metavar="EPOCH:KEY=V[,KEY=V]", multiple=True, convert=regime_items))
    eval_schedule: str | None = option(None, "when to evaluate on held-out data", schedule,
                                       cli=Flag(default_text="epoch; every:10 for full batch"))
    checkpoint_schedule: str | None = option(None, "when to checkpoint", schedule,
                                             cli=Flag(default_text="epoch; every:100 for full batch"))
    plugins: list[str] | None = option(
        None, "activate a plugin (repeatable)", plugin_names, what="a list of plugin names",
        cli=Flag("--plugin", metavar="NAME", multiple=True, convert=list, default_text=", ".join(DEFAULT_PLUGINS)))
    plugin_options: dict[str, dict[str, Any]] = option(
        {}, "plugin option (repeatable)", tables,
        cli=Flag("-o", metavar="PLUGIN.KEY=VALUE", multiple=True, convert=plugin_option_items))
    disable: list[str] = option([], "switch off an always-on plugin", names, what="a list of plugin names",
                                cli=Flag(metavar="NAME", multiple=True, convert=list))
    out: str | None = option(None, "run store path", path, what="a path",
                             cli=Flag(default_text="runs/MODEL-DATA-TIME.zarr"))
    seed: int = option(0, "training seed: initialisation, batch order, probes' draws", integer,
                       within="[-2**63, 2**63)", what="a 64-bit integer (|seed| < 2**63)")
    #: seed of the data factory (the train/eval split, synthetic data), apart from ``seed``
    data_seed: int = option(0, "data seed: the train/eval split and synthetic data (--seed leaves it alone)",
                            integer, within="[0, 2**32)", what="an integer in [0, 2**32)")
    #: a name for the run: labels in figures and tables, and the default store name
    name: str | None = option(None, "run name: figure and table labels, and the store runs/NAME.zarr")
    #: stop once the training loss on a fixed subset of 1024 samples is at most this
    until_loss: float | None = option(
        None, "stop once the training loss on a fixed subset of 1024 samples is <= X (loss-matched runs); the cap is "
              f"--steps, --epochs or --time-limit, else {UNTIL_LOSS_EPOCHS} epochs", real,
        what="a finite number", cli=Flag(metavar="X"))
    #: steps between those checks
    until_loss_every: int = option(1, "steps between those checks", integer, within="[1, inf)",
                                   what="a positive integer", cli=Flag(metavar="N"))
    device: str = option("cpu", "cpu or cuda", parse_device, what="cpu or cuda")
    progress: bool = option(True, "a progress bar on a terminal, else log lines with an ETA", flag,
                            what="true or false", cli=Flag("--progress/--no-progress", is_flag=True))
    on_nan: str = option("stop", "what a NaN/inf loss does", choices=("stop", "continue"))
    drop_last: bool = option(False, "drop the last incomplete batch of each epoch", flag, what="true or false",
                             cli=Flag(is_flag=True))
    resume: str | None = option(None, "continue a run from its last checkpoint; with --steps/--epochs/--time-limit, "
                                "extend it", path, what="a path", cli=Flag(metavar="PATH"))
    #: ``module:fn`` turning ``(model, batch)`` into ``(output, target)`` (default: tuples and dicts)
    adapter: str | None = option(None, "fn(model, batch) -> (output, target) for unusual batches",
                                 cli=Flag(metavar="MODULE:FN"))
    #: DataLoader worker processes (None: 0 on CPU, min(8, cores) on CUDA)
    workers: int | None = option(None, "DataLoader worker processes", integer, within="[0, 1024]",
                                 what="an integer in [0, 1024] (processes, each a copy of the data set)", cli=Flag(default_text="0 on CPU, min(8, cores) on CUDA"))
    #: split every training batch into chunks of this many samples (gradients accumulate)
    micro_batch_size: int | None = option(
        None, "split each batch (also 'full') into chunks of N samples; gradients accumulate", integer,
        within="[1, inf)", what="a positive integer", cli=Flag(metavar="N"))
    #: fp32, bf16 or fp16 (autocast; fp16 with a GradScaler)
    precision: str = option("fp32", "training precision (autocast; fp16 with a GradScaler); probes stay fp32",
                            parse_precision, choices=PRECISIONS)
    #: wrap the training forward in torch.compile (true, or a backend name)
    compile: bool | str = option(False, "torch.compile the training forward (in a file: true or a backend name)",
                                 compile_mode, what="true/false or a torch.compile backend name",
                                 cli=Flag(is_flag=True))
    #: check the loss for NaN/inf every N steps (None: every step on CPU, every 50 on CUDA)
    nan_check_every: int | None = option(
        None, "check the loss for NaN/inf every N steps (one host sync)", integer, within="[1, inf)",
        what="a positive integer", cli=Flag(metavar="N", default_text="1 on CPU, 50 on CUDA"))
    #: the share of training wall time that probes may take; scheduled firings over it are skipped
    probe_budget: float | None = option(
        None, "spend at most this fraction of the training wall time in probes (e.g. 0.05): scheduled "
        "measurements that would go over it are skipped; the realised overhead is the root attr probe_overhead",
        real, within="(0, 1]", what="a fraction in (0, 1], e.g. 0.05", cli=Flag(metavar="F"))
    #: ddp (a full model per rank) or fsdp (FSDP2 shards parameters, gradients, optimizer state)
    strategy: str = option("ddp", "under torchrun: ddp (a full model per rank) or fsdp (FSDP2 shards it; "
                           "docs/scaling.md)", parse_precision, choices=STRATEGIES)

    #: epochs used when neither epochs, steps nor a time limit is given
    DEFAULT_EPOCHS = DEFAULT_EPOCHS
    #: the same with ``until_loss``: the target stops the run, this only caps it
    UNTIL_LOSS_EPOCHS = UNTIL_LOSS_EPOCHS

    def __post_init__(self) -> None:
        #: where each value not given in Python came from (``Spelling``), for error messages
        self.sources: dict[str, Spelling] = {}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> "RunConfig":
        """Build from a dict (a parsed TOML file); unknown keys and values of the wrong type
        are a ``UsageError`` naming the key."""
        data = dict(data)
        where = in_file(source)
        plugin_tables = data.pop("plugins", None)
        values: dict[str, Any] = {}
        if isinstance(plugin_tables, dict):
            # [plugins] may hold the active list as `active = [...]` plus one table per plugin
            active = plugin_tables.pop("active", None)
            bad = [k for k, v in plugin_tables.items() if not isinstance(v, dict)]
            if bad:
                raise UsageError(f"{source}: [plugins] entry '{bad[0]}' must be a table of options")
            values["plugin_options"] = plugin_tables
            if active is not None:
                values["plugins"] = active
        elif plugin_tables is not None:
            values["plugins"] = plugin_tables
        options = run_options()
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in options:
                raise UsageError(f"{source}: unknown key '{key}'{did_you_mean(name, options)} "
                                 "(see `lscape run --help` for the options)")
            if name == "plugin_options" and "plugin_options" in values:
                value = {**values["plugin_options"], **tables(value)} if isinstance(value, Mapping) else value
            values[name] = value
        cfg = cls().merged(values, where)
        if cfg.plugin_options:  # tables for plugins not listed in `plugins` activate them too
            cfg.plugins = list(dict.fromkeys([*(cfg.plugins or []), *cfg.plugin_options]))
        return cfg

    @classmethod
    def stored(cls, reader: Any) -> "RunConfig":
        """The configuration a run store recorded (``reader`` a ``RunReader``), with its
        plugins and their options, as ``--resume`` and ``lscape measure`` rebuild it."""
        from .store import stored_config

        data = stored_config(reader)  # a config attribute that is no table is one line
        plugins = data.pop("plugins", None)
        plugin_options = data.pop("plugin_options", None) or {}
        data.pop("resume", None)
        cfg = cls.from_mapping(data, source=reader.path)
        cfg.plugins = list(plugins or [])
        cfg.plugin_options = {k: dict(v) for k, v in plugin_options.items()}
        return cfg

    def merged(self, overrides: Mapping[str, Any], source: Spelling = PYTHON) -> "RunConfig":
        """A copy with the non-None ``overrides`` applied (command line over file), each
        converted to its option's type; ``source`` is where they were given."""
        options = run_options()
        unknown = sorted(set(overrides) - set(options))
        if unknown:
            raise UsageError(f"unknown run option '{unknown[0]}'{did_you_mean(unknown[0], options)}")
        values = dataclasses.asdict(self)
        sources = dict(self.sources)
        # the run's length is one choice: --steps on the command line replaces the file's epochs
        for given, other in (("steps", "epochs"), ("epochs", "steps")):
            if overrides.get(given) is not None and overrides.get(other) is None:
                values[other] = None
        for key, value in overrides.items():
            if value is None:
                continue
            value = options[key].convert(value, source)
            if key in ("model_opts", "data_opts", "optimizer_opts"):
                value = {**values[key], **value}
            elif key == "plugin_options":
                merged = {k: dict(v) for k, v in values[key].items()}
                for plugin, opts in value.items():
                    merged.setdefault(plugin, {}).update(opts)
                value = merged
            values[key] = value
            sources[key] = source
        out = RunConfig(**values)
        out.sources = sources
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, as stored in the run's attributes."""
        return dataclasses.asdict(self)

    def check(self) -> dict[str, Any]:
        """Every value checked against its option, and the options against each other, in
        the words of where each was given; returns the checked values (typed: ``"0.5"`` →
        ``0.5``). Pure: changes nothing. Raises ``UsageError`` on the first bad value."""
        options = run_options()
        values = {name: opt.check(getattr(self, name), self._source(name)) for name, opt in options.items()}

        def spelled(name: str) -> str:
            return options[name].spelled(self._source(name))

        if values["epochs"] is not None and values["steps"] is not None:
            raise UsageError(f"give {spelled('epochs')} or {spelled('steps')}, not both")
        if values["strategy"] == "fsdp" and values["precision"] == "fp16":
            raise UsageError(f"{spelled('precision')} fp16 (a GradScaler) does not combine with {spelled('strategy')} "
                             f"fsdp; use {spelled('precision')} bf16")
        if values["regime"] is not None and values["lr_schedule"].split(":", 1)[0] != "constant":
            raise UsageError(f"a regime sets the learning rate per epoch: use it with {spelled('lr_schedule')} "
                             "constant")
        return values

    def validate(self) -> "RunConfig":
        """``check()``, then normalisation: the checked values, and the defaults that depend
        on other options, are written into this config; returns self."""
        values = self.check()
        for name, value in values.items():
            setattr(self, name, value)
        if self.checkpoint_schedule is None:
            # every epoch, but not every step of full-batch training
            self.checkpoint_schedule = "every:100" if self.batch_size == "full" else "epoch"
        if self.eval_schedule is None:
            self.eval_schedule = "every:10" if self.batch_size == "full" else "epoch"
        if self.plugins is None:
            self.plugins = list(DEFAULT_PLUGINS)
        if self.disable is None:
            self.disable = []
        for name in ("model_opts", "data_opts", "optimizer_opts", "plugin_options"):
            if getattr(self, name) is None:
                setattr(self, name, {})
        return self

    def _source(self, name: str) -> Spelling:
        return self.sources.get(name, PYTHON)

    @property
    def total_epochs(self) -> int | None:
        if self.epochs is not None:
            return self.epochs
        if self.steps is None and self.time_limit is None:
            return self.UNTIL_LOSS_EPOCHS if self.until_loss is not None else self.DEFAULT_EPOCHS
        return None


def run_options() -> dict[str, Option]:
    """The table of run options: one ``Option`` per ``RunConfig`` field, by field name."""
    return dict(_OPTIONS)


_OPTIONS = {f.name: dataclasses.replace(f.metadata[OPTION], name=f.name) for f in dataclasses.fields(RunConfig)}


def parse_step_schedule(text: str) -> tuple[list[int], float]:
    """``step:30,60:0.1`` → milestones ``[30, 60]`` (epochs) and factor ``0.1``."""
    try:
        _, milestones, gamma = text.split(":")
        ms = sorted(int(m) for m in milestones.split(","))
        g = float(gamma)
        if not ms or not math.isfinite(g) or g <= 0:
            raise ValueError
        return ms, g
    except ValueError:
        raise UsageError(f"bad --lr-schedule '{text}': use step:EPOCH,EPOCH:GAMMA, e.g. step:30,60:0.1") from None


def load_toml(path: str | Path) -> RunConfig:
    """Read an experiment file; a missing or malformed file is a ``UsageError``."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {p} is not valid TOML: {e}") from e
    return RunConfig.from_mapping(data, source=str(p))


def _regime(regime: Any) -> dict[str, dict[str, float]]:
    """``{epoch: {lr, momentum, weight_decay}}`` checked with those options' own checks."""
    if not isinstance(regime, Mapping):
        raise ValueError("{option} must be a table {epoch = {lr = ..., momentum = ..., weight_decay = ...}}")
    out: dict[str, dict[str, float]] = {}
    for epoch, settings in regime.items():
        try:
            e = int(epoch)
        except ValueError:
            raise ValueError(f"{{option}} key '{epoch}' is not an epoch number") from None
        if not isinstance(settings, Mapping):
            raise ValueError(f"{{option}} entry {epoch} must be a table of settings")
        bad = set(settings) - {"lr", "momentum", "weight_decay", "optimizer"}
        if bad:
            raise ValueError(f"{{option}} entry {epoch}: unknown setting '{sorted(bad)[0]}' (lr, momentum, "
                             "weight_decay)")
        checked = {}
        for key, value in settings.items():
            if key == "optimizer":
                continue
            try:
                checked[key] = _OPTIONS[key].check(value)
            except UsageError:
                raise ValueError(f"{{option}} entry {epoch}: {key} = {value!r} is out of range "
                                 f"({_OPTIONS[key].what or _OPTIONS[key].within})") from None
        out[str(e)] = checked
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

