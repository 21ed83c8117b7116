"""The run configuration: one dataclass, filled from a TOML file and the command line.

Every command-line option has a TOML key of the same name with underscores
(``--batch-size`` → ``batch_size``); plugin options live in ``[plugins.NAME]`` tables.
The command line overrides the file. ``validate()`` checks values before anything is
written and raises ``UsageError`` with one line naming the problem.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError, did_you_mean
from .schedule import Schedule, parse_duration

__all__ = ["RunConfig", "load_toml", "LR_SCHEDULES", "PRECISIONS", "STRATEGIES"]

LR_SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
#: how torchrun's processes share the model: replicated (DDP) or sharded (FSDP2)
STRATEGIES = ("ddp", "fsdp")
_FLOAT32_MAX = 3.4028234663852886e38
#: probes active when neither the config file nor the command line names any
DEFAULT_PLUGINS = ("grad-norm",)


@dataclass
class RunConfig:
    """Everything that defines a run. Defaults are the built-in default experiment."""

    model: str = "mlp"
    model_opts: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_opts: dict[str, Any] = field(default_factory=dict)
    loss: str = "ce"
    optimizer: str = "sgd"
    optimizer_opts: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    batch_size: int | str = 64
    epochs: int | None = None
    steps: int | None = None
    time_limit: float | None = None
    lr_schedule: str = "constant"
    regime: dict[str, dict[str, float]] | None = None
    eval_schedule: str | None = None
    checkpoint_schedule: str | None = None
    plugins: list[str] | None = None
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    disable: list[str] = field(default_factory=list)
    out: str | None = None
    seed: int = 0
    #: seed of the data factory (the train/eval split, synthetic data), apart from ``seed``
    data_seed: int = 0
    #: a name for the run: labels in figures and tables, and the default store name
    name: str | None = None
    #: stop once the training loss on a fixed subset of 1024 samples is at most this
    until_loss: float | None = None
    #: steps between those checks
    until_loss_every: int = 1
    device: str = "cpu"
    progress: bool = True
    on_nan: str = "stop"
    drop_last: bool = False
    resume: str | None = None
    #: ``module:fn`` turning ``(model, batch)`` into ``(output, target)`` (default: tuples and dicts)
    adapter: str | None = None
    #: DataLoader worker processes (None: 0 on CPU, min(8, cores) on CUDA)
    workers: int | None = None
    #: split every training batch into chunks of this many samples (gradients accumulate)
    micro_batch_size: int | None = None
    #: fp32, bf16 or fp16 (autocast; fp16 with a GradScaler)
    precision: str = "fp32"
    #: wrap the training forward in torch.compile (true, or a backend name)
    compile: bool | str = False
    #: check the loss for NaN/inf every N steps (None: every step on CPU, every 50 on CUDA)
    nan_check_every: int | None = None
    #: ddp (a full model per rank) or fsdp (FSDP2 shards parameters, gradients, optimizer state)
    strategy: str = "ddp"

    #: epochs used when neither epochs, steps nor a time limit is given
    DEFAULT_EPOCHS = 10

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> "RunConfig":
        """Build from a dict (a parsed TOML file); unknown keys are a ``UsageError``."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        plugin_tables = data.pop("plugins", None)
        kwargs: dict[str, Any] = {}
        if isinstance(plugin_tables, dict):
            # [plugins] may hold the active list as `active = [...]` plus one table per plugin
            active = plugin_tables.pop("active", None)
            kwargs["plugin_options"] = {k: dict(v) for k, v in plugin_tables.items() if isinstance(v, dict)}
            bad = [k for k, v in plugin_tables.items() if not isinstance(v, dict)]
            if bad:
                raise UsageError(f"{source}: [plugins] entry '{bad[0]}' must be a table of options")
            if active is not None:
                kwargs["plugins"] = _names(f"{source}: [plugins] active", active)
        elif isinstance(plugin_tables, list):
            kwargs["plugins"] = _names(f"{source}: plugins", plugin_tables)
        elif plugin_tables is not None:
            raise UsageError(f"{source}: 'plugins' must be a list of names or a table")
        for key, value in data.items():
            name = key.replace("-", "_")
            if name == "plugin_options":
                if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                    raise UsageError(f"{source}: '{key}' must be a table of tables, one per plugin")
                kwargs.setdefault("plugin_options", {}).update({k: dict(v) for k, v in value.items()})
                continue
            if name not in known:
                raise UsageError(f"{source}: unknown key '{key}'{did_you_mean(name, known)} "
                                 "(see `lscape run --help` for the options)")
            kwargs[name] = value
        if "plugin_options" in kwargs:
            # tables for plugins not listed in `plugins` activate them too
            listed = kwargs.get("plugins") or []
            kwargs["plugins"] = list(dict.fromkeys([*listed, *kwargs["plugin_options"]]))
        return cls(**kwargs).check_types(source)

    @classmethod
    def stored(cls, reader: Any) -> "RunConfig":
        """The configuration a run store recorded (``reader`` a ``RunReader``), with its
        plugins and their options, as ``--resume`` and ``lscape measure`` rebuild it."""
        data = dict(reader.attrs.get("config", {}))
        plugins = data.pop("plugins", None)
        plugin_options = data.pop("plugin_options", None) or {}
        data.pop("resume", None)
        cfg = cls.from_mapping(data, source=reader.path)
        cfg.plugins = list(plugins or [])
        cfg.plugin_options = {k: dict(v) for k, v in plugin_options.items()}
        return cfg

    def merged(self, overrides: Mapping[str, Any]) -> "RunConfig":
        """A copy with the non-None ``overrides`` applied (command line over file)."""
        values = dataclasses.asdict(self)
        # the run's length is one choice: --steps on the command line replaces the file's epochs
        for given, other in (("steps", "epochs"), ("epochs", "steps")):
            if overrides.get(given) is not None and overrides.get(other) is None:
                values[other] = None
        for key, value in overrides.items():
            if value is None:
                continue
            if not isinstance(value, Mapping) or not isinstance(values.get(key), Mapping):
                values[key] = value  # check_types() names a wrong type
            elif key in ("model_opts", "data_opts", "optimizer_opts"):
                values[key] = {**values[key], **value}
            elif key == "plugin_options":
                merged = {k: dict(v) for k, v in values[key].items()}
                for plugin, opts in value.items():
                    if not isinstance(opts, Mapping):
                        raise UsageError(f"options of plugin '{plugin}' must be a table of KEY = VALUE")
                    merged.setdefault(plugin, {}).update(opts)
                values[key] = merged
            else:
                values[key] = value
        return RunConfig(**values)

    def check_types(self, source: str = "") -> "RunConfig":
        """Check the kind of every value (text, table, list, flag); returns self.

        Numbers are checked by ``validate()``; this catches what a config file can hold
        but the engine cannot use (a list for ``model``, a string for ``model_opts``).
        """
        where = f"{source}: " if source else ""

        def bad(name: str, what: str, value: Any) -> UsageError:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return UsageError(f"{where}'{name}' must be {what}, got {shown}")

        for name in ("model", "data", "loss", "optimizer", "lr_schedule", "device", "on_nan", "precision", "strategy"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "text", getattr(self, name))
        for name in ("eval_schedule", "checkpoint_schedule", "out", "resume", "adapter", "name"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str):
                raise bad(name, "text", value)
        for name in ("out", "resume"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise UsageError(f"{where}--{name} must be a path, got '{value}'")
        for name in ("model_opts", "data_opts", "optimizer_opts", "plugin_options"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise bad(name, "a table of KEY = VALUE", value)
        for plugin, opts in self.plugin_options.items():
            if not isinstance(opts, Mapping) or not all(isinstance(k, str) for k in opts):
                raise bad(f"plugins.{plugin}", "a table of KEY = VALUE", opts)
        for name in ("nesterov", "progress", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false", getattr(self, name))
        if self.plugins is not None and not isinstance(self.plugins, str):
            self.plugins = _names(f"{where}plugins", self.plugins)
        if self.disable is None:
            self.disable = []
        elif isinstance(self.disable, str):
            self.disable = [self.disable]
        else:
            self.disable = _names(f"{where}disable", self.disable)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, as stored in the run's attributes."""
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check every value; returns self. Raises ``UsageError`` on the first bad one."""
        self.check_types()
        self.lr = _number("lr", self.lr, positive=True)
        self.momentum = _number("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        self.weight_decay = _number("weight-decay", self.weight_decay)
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if isinstance(self.batch_size, str):
            if self.batch_size.strip().lower() == "full":
                self.batch_size = "full"
            else:
                self.batch_size = _integer("batch-size", self.batch_size, "a positive integer or 'full'")
        elif not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool):
            raise UsageError(f"--batch-size must be a positive integer or 'full', got {self.batch_size!r}")
        if self.batch_size != "full" and self.batch_size < 1:
            raise UsageError(f"--batch-size must be a positive integer or 'full', got {self.batch_size}")
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None:
                value = _integer(name, value, "a positive integer")
                if value < 1:
                    raise UsageError(f"--{name} must be a positive integer, got {value}")
                setattr(self, name, value)
        if self.epochs is not None and self.steps is not None:
            raise UsageError("give --epochs or --steps, not both")
        if self.time_limit is not None:
            self.time_limit = parse_duration(self.time_limit)
        self.seed = _integer("seed", self.seed, "an integer")
        if not -2**63 <= self.seed < 2**63:  # what torch.manual_seed takes
            raise UsageError(f"--seed must be a 64-bit integer (|seed| < 2**63), got {self.seed}")
        if self.until_loss is not None:
            self.until_loss = _number("until-loss", self.until_loss)
        self.until_loss_every = _integer("until-loss-every", self.until_loss_every, "a positive integer")
        if self.until_loss_every < 1:
            raise UsageError(f"--until-loss-every must be a positive integer, got {self.until_loss_every}")
        self.data_seed = _integer("data-seed", self.data_seed, "an integer")
        if not 0 <= self.data_seed < 2**32:
            raise UsageError(f"--data-seed must be an integer in [0, 2**32), got {self.data_seed}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UsageError(f"--device must be cpu or cuda, got '{self.device}'")
        for name in ("workers", "micro_batch_size", "nan_check_every"):
            value = getattr(self, name)
            if value is not None:
                value = _integer(name.replace("_", "-"), value, "a non-negative integer")
                if value < (0 if name == "workers" else 1):
                    raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'workers' else '>= 1'}, "
                                     f"got {value}")
                setattr(self, name, value)
        self.precision = self.precision.strip().lower()
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        self.strategy = self.strategy.strip().lower()
        if self.strategy not in STRATEGIES:
            raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise UsageError("--precision fp16 (a GradScaler) does not combine with --strategy fsdp; use --precision bf16")
        if not isinstance(self.compile, (bool, str)) or (isinstance(self.compile, str) and not self.compile.strip()):
            raise UsageError(f"compile must be true/false or a torch.compile backend name, got {self.compile!r}")
        if self.on_nan not in ("stop", "continue"):
            raise UsageError(f"on_nan must be 'stop' or 'continue', got '{self.on_nan}'")
        kind = self.lr_schedule.split(":", 1)[0]
        if kind not in LR_SCHEDULES:
            raise UsageError(f"bad --lr-schedule '{self.lr_schedule}': use constant, step:EPOCH,EPOCH:GAMMA or cosine")
        if kind == "step":
            parse_step_schedule(self.lr_schedule)
        if self.regime is not None:
            self.regime = _regime(self.regime)
            if kind != "constant":
                raise UsageError("a regime sets the learning rate per epoch: use it with --lr-schedule constant")
        if self.checkpoint_schedule is None:
            # every epoch, but not every step of full-batch training
            self.checkpoint_schedule = "every:100" if self.batch_size == "full" else "epoch"
        if self.eval_schedule is None:
            self.eval_schedule = "every:10" if self.batch_size == "full" else "epoch"
        for name in ("eval_schedule", "checkpoint_schedule"):
            Schedule.parse(getattr(self, name))
        if self.plugins is None:
            self.plugins = list(DEFAULT_PLUGINS)
        elif isinstance(self.plugins, str):
            self.plugins = [self.plugins]
        for name in self.plugins:
            if not name.strip() or name.startswith("."):  # neither a plugin nor an importable module
                raise UsageError(f"unknown plugin '{name}' (see `lscape plugins`)")
        return self

    @property
    def total_epochs(self) -> int | None:
        if self.epochs is not None:
            return self.epochs
        if self.steps is None and self.time_limit is None:
            return self.DEFAULT_EPOCHS
        return None


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


def _names(what: str, value: Any) -> list[str]:
    """A list of plugin names; anything else is a ``UsageError``."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{what} must be a list of plugin names, got {value!r}"[:200])
    return list(value)


def _number(name: str, value: Any, positive: bool = False) -> float:
    """``value`` as a finite float; ``name`` is an option (``lr`` → "--lr") or a phrase."""
    label = name if " " in name else f"--{name}"
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{label} must be a number, got '{value}'") from None
    if not math.isfinite(out) or (positive and out <= 0):
        raise UsageError(f"{label} must be a {'positive ' if positive else ''}finite number, got '{value}'")
    if abs(out) > _FLOAT32_MAX:  # torch casts it to the parameters' float32 and overflows
        raise UsageError(f"{label} must be at most {_FLOAT32_MAX:.4g} in size, got '{value}'")
    return out


def _integer(name: str, value: Any, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be {what}, got '{value}'") from None


def _regime(regime: Any) -> dict[str, dict[str, float]]:
    if not isinstance(regime, Mapping):
        raise UsageError("regime must be a table {epoch = {lr = ..., momentum = ..., weight_decay = ...}}")
    out: dict[str, dict[str, float]] = {}
    for epoch, settings in regime.items():
        try:
            e = int(epoch)
        except ValueError:
            raise UsageError(f"regime key '{epoch}' is not an epoch number") from None
        if not isinstance(settings, Mapping):
            raise UsageError(f"regime entry {epoch} must be a table of settings")
        bad = set(settings) - {"lr", "momentum", "weight_decay", "optimizer"}
        if bad:
            raise UsageError(f"regime entry {epoch}: unknown setting '{sorted(bad)[0]}' (lr, momentum, weight_decay)")
        checked = {}
        for key, value in settings.items():
            if key == "optimizer":
                continue
            number = _number(f"regime {epoch}.{key}", value, positive=key == "lr")
            if key == "momentum" and not 0 <= number < 1 or key == "weight_decay" and number < 0:
                raise UsageError(f"regime entry {epoch}: {key} = {number} is out of range")
            checked[key] = number
        out[str(e)] = checked
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
