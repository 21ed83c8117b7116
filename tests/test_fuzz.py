"""Bad input, fuzzed: random command lines and config files never reach the user as a
traceback, never leave a half-created store, and never touch an existing one.

Every generated run is tiny (synthetic data n <= 64, dim <= 8, widths 4, at most 2
steps) or fails validation before training, so the file runs in well under a minute.
The outcome of every `lscape run` must be one of:

* exit 0: a store at --out with status ``completed``, and nothing else created;
* exit 2: exactly one stderr line starting with ``error:``, and nothing created at all;
* exit 1: a plugin failure named on one ``error: plugin '...' failed`` line with the store
  marked ``failed``, or a run that diverged (legitimate for e.g. a huge learning rate)
  recorded as ``diverged``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
import tomllib
from datetime import date, datetime, time as dtime
from pathlib import Path

import pytest
import torch
from hypothesis import currently_in_test_context, HealthCheck, event, given, settings
from hypothesis import strategies as st

from lscape.config import RunConfig

#: LSCAPE_FUZZ_SCALE=10 runs ten times the examples (a longer local or nightly search)
SCALE = float(os.environ.get("LSCAPE_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

# the size of every generated run is pinned by these (later options override earlier ones)
TINY = ["--data", "synthetic", "--data-opt", "n=32", "--data-opt", "dim=4", "--data-opt", "classes=2",
        "--model-opt", "widths=4", "--batch-size", "16", "--steps", "1", "--no-progress"]
GUARD = ["--steps", "1", "--data-opt", "n=32", "--data-opt", "dim=4", "--data-opt", "classes=2",
         "--model-opt", "widths=4", "--no-progress"]

PLUGINS = ["grad-norm", "grad-stats", "grad-noise", "hessian", "hessian-exact", "sharpness", "landscape",
           "layer-norms", "trajectory", "diffusion", "eos", "sam", "smoothout", "entropy-sgd", "interpolate",
           "eps-sharpness", "train-metrics", "progress"]
OPTION_KEYS = ["schedule", "every", "data", "params", "iters", "k", "tol", "rho", "radius", "points", "samples",
               "batch", "steps", "other", "n", "top", "method"]

# -- scalar strategies ----------------------------------------------------------------------

CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")  # argv cannot hold NUL
TEXT = st.text(CHARS, max_size=12)
SPECIAL = st.sampled_from([
    "", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "-1", "0", "-0", "0.0", "1", "2",
    "1.5", "1e-3", "1e308", "99999999999999999999999", "-99999999999999999999999", "0x10", "1_000", "true",
    "false", "None", "null", "full", "∞", "١", "½", "3.0", "=", ":", ",", "--", "-", "'", '"', "\n", "\t",
    "é", "日本", "🙂", "1,2", "[1]", "{}", "4,,4",
])
JUNK = st.one_of(TEXT, SPECIAL, st.integers().map(str), st.floats().map(repr))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _not_big(text: str, limit: float = 64) -> bool:
    """False for a finite number above ``limit`` (an option that sizes work: iterations,
    points, widths, steps): valid, but no longer a tiny run."""
    x = _number(text)
    try:
        i = int(text)
    except (TypeError, ValueError):
        i = None
    return not ((x is not None and math.isfinite(x) and abs(x) > limit) or (i is not None and abs(i) > limit))


SMALL_JUNK = JUNK.filter(_not_big)
STEPS = st.one_of(st.sampled_from(["1", "2", "0", "-1", "-99999999999999999999", "1.5", "2.0", "x", ""]),
                  JUNK.filter(lambda s: _not_big(s, 2)))
SCHEDULE = st.one_of(
    st.sampled_from(["every:1", "every:2:1", "every:0", "every:-1", "every:1:2:3", "every:", "at:0,1", "at:",
                     "at:-1", "at:1e3", "log:0:2:2", "log:5:1:3", "log:0:10:0", "log:0:10:100000000",
                     "log:0:999999999999999999:999999999999", "epoch", "epoch:1", "never", "never:x", "time:1s",
                     "time:0", "time:nan", "time:-1", "time:", "weekly", "", "EVERY:1", " every : 1 "]),
    st.builds(lambda k, parts: k + ":" + ":".join(parts),
              st.sampled_from(["every", "at", "log", "time", "epoch", "never"]),
              st.lists(SMALL_JUNK, min_size=0, max_size=4)),
    SMALL_JUNK,
)


def _kv(keys, values):
    good = st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(keys), TEXT), values)
    bad = st.sampled_from(["novalue", "=", "=1", "", " =1", "a", "==", "k==v"])
    return st.one_of(good, good, bad)


def _opt(flag, values):
    return st.tuples(st.just(flag), values).map(list)


PLUGIN_OPTION = st.one_of(
    st.builds(lambda p, k, v: f"{p}.{k}={v}", st.one_of(st.sampled_from(PLUGINS), TEXT),
              st.one_of(st.sampled_from(OPTION_KEYS), TEXT), st.one_of(SMALL_JUNK, SCHEDULE)),
    st.builds(lambda p, s: f"{p}.schedule={s}", st.sampled_from(["grad-norm", "sharpness", "hessian"]), SCHEDULE),
    st.sampled_from(["garbage", ".x=1", "a.=1", "=", "a.b", ".=.", "grad-norm.=1", "grad-norm.every",
                     "...=", " . = ", "grad-norm.every=", "grad-norm..every=1"]),
)

CLI_OPTION = st.one_of(
    _opt("--lr", JUNK), _opt("--momentum", JUNK), _opt("--weight-decay", JUNK),
    _opt("--batch-size", st.one_of(JUNK, st.sampled_from(["full", "FULL", " full ", "1", "64", "65"]))),
    _opt("--epochs", JUNK), _opt("--steps", STEPS), _opt("--time-limit", JUNK),
    _opt("--lr-schedule", st.one_of(JUNK, st.sampled_from([
        "constant", "cosine", "step:1:0.1", "step:1,2:0.5", "step", "step:", "step::", "step:a:b", "step:1:nan",
        "step:1:inf", "step:1:-1", "step:-1:0.1", "cosine:5", "constant:x", "step:1:0.1:2"]))),
    _opt("--eval-schedule", SCHEDULE), _opt("--checkpoint-schedule", SCHEDULE),
    _opt("--seed", st.one_of(JUNK, st.integers().map(str))),
    _opt("--device", st.one_of(TEXT, st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:x", "tpu", "", "CPU", "cpu:0",
                                                      "meta", "mps"]))),
    _opt("--on-nan", st.one_of(TEXT, st.sampled_from(["stop", "continue", "STOP"]))),
    _opt("--model", st.sampled_from(["mlp", "sam-mlp", "cnn", "lenet", "nope", "", "zz_no_module:f", "os:nope",
                                     "math:pi", "math:sqrt", "builtins:int", "torch.nn:Linear", ":", "mlp:", ":x", ".x:f", "os:", "torch.optim:SGD"])),
    # (not in_features/out_features: a shape mismatch with the data is test_shape_mismatch_is_bad_input)
    _opt("--model-opt", _kv(["widths", "activation", "bias"],
                           st.one_of(SMALL_JUNK, st.sampled_from(["4", "4,4", " 4 , 4 ", "0", "-1", "tanh",
                                                                  "gelu", "nope"])))),
    _opt("--data", st.sampled_from(["synthetic", "digits", "nope", "", "zz_no_module:f", "os:nope", "math:pi",
                                    "builtins:list", "SYNTHETIC"])),
    _opt("--data-opt", _kv(["n", "dim", "classes", "noise", "task", "eval_fraction", "outputs", "seed"],
                          st.one_of(SMALL_JUNK, st.sampled_from(["2", "3", "8", "regression", "0.5", "0.99",
                                                                 "1e300"])))),
    # (not torch.nn:MSELoss: its shape mismatch with class targets is test_shape_mismatch_is_bad_input)
    _opt("--loss", st.sampled_from(["ce", "mse", "hinge", "", "math:pi", "math:sqrt", "torch.nn:CrossEntropyLoss",
                                    "torch.nn:Linear", "torch.nn:MSELoss(", "zz_no_module:f"])),
    _opt("--optimizer", st.sampled_from(["sgd", "adam", "adamw", "lion", "", "torch.optim:Adam", "torch.optim:SGD",
                                         "math:pi", "os:path", "torch.nn:Linear", "torch.optim:LBFGS"])),
    _opt("--optimizer-opt", _kv(["beta2", "eps", "dampening", "nesterov", "momentum", "betas", "amsgrad"],
                               SMALL_JUNK)),
    _opt("--plugin", st.one_of(st.sampled_from(PLUGINS + ["helpers_plugins", "zz-nope", "", "json", "os.path", ".x",
                                                      "..", "lscape", "x:y", "a..b"]),
                               TEXT.map(lambda t: "zz" + t))),
    _opt("--disable", st.sampled_from(["train-metrics", "progress", "grad-norm", "nope", ""])),
    _opt("-o", PLUGIN_OPTION),
    _opt("--resume", st.sampled_from(["nowhere.zarr", "", "."])),
    _opt("--config", st.sampled_from(["missing.toml", ".", "nope/x.toml"])),
    st.sampled_from([["--nesterov"], ["--no-progress"], ["--no-such-flag"], ["-x"], ["--help-me"], ["extra"],
                     ["--on-nan"]]),
)


# -- checking an outcome --------------------------------------------------------------------

def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with the bytes of files (None for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() else None
    return out


def _status(path: Path) -> str | None:
    from lscape.store import RunReader

    return RunReader(path).attrs.get("status")


def check_outcome(code, out, err, cwd: Path, before: set[str], out_path: Path, args) -> None:
    where = f"args={args!r}\nexit={code}\nstdout={out!r}\nstderr={err!r}"
    assert "Traceback" not in out + err, where
    lines = [line for line in err.splitlines() if line.strip()]
    if currently_in_test_context():
        event(f"exit {code}")  # --hypothesis-show-statistics shows how deep the inputs get
    after = set(os.listdir(cwd))
    if code == 0:
        assert out_path.name in after, where
        assert after == before | {out_path.name}, where  # nothing but the store written
        assert _status(out_path) == "completed", where
    elif code == 2:
        assert len(lines) == 1 and lines[0].startswith("error:"), where
        assert after == before, where  # no runs/, no --out, nothing half-created
    elif code == 1:
        errors = [line for line in lines if line.startswith("error:")]
        assert all(line.startswith(("error:", "[lscape]")) for line in lines), where
        assert after <= before | {out_path.name}, where
        if errors:
            assert len(errors) == 1 and errors[0].startswith("error: plugin '") and " failed: " in errors[0], where
            assert _status(out_path) == "failed", where
        else:  # a legitimately diverging run (a huge lr, nan noise in the data)
            assert _status(out_path) == "diverged" and "run diverged" in out, where
    else:
        raise AssertionError(f"unexpected exit status\n{where}")


@contextlib.contextmanager
def fresh_dir():
    with tempfile.TemporaryDirectory(prefix="lscape-fuzz-") as d, contextlib.chdir(d):
        yield Path(d)


# -- 1. command lines -----------------------------------------------------------------------

@settings(max_examples=examples(300), **SETTINGS)
@given(options=st.lists(CLI_OPTION, min_size=1, max_size=5))
def test_fuzzed_command_line(cli, options):
    args = [a for opt in options for a in opt]
    with fresh_dir() as cwd:
        before = set(os.listdir(cwd))
        out_path = cwd / "out.zarr"
        full = ["run", *TINY, *args, "--out", out_path]
        code, out, err = cli(*full)
        check_outcome(code, out, err, cwd, before, out_path, full)


# -- 2. config files ------------------------------------------------------------------------

def _toml_key(key: str) -> str:
    return _toml_string(key)


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value) -> str:
    """A tiny TOML writer: every table inline, enough for round-tripping generated data."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_dumps(data: dict) -> str:
    return "".join(f"{_toml_key(k)} = {toml_value(v)}\n" for k, v in data.items())


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def _toml_tree(ints):
    scalars = st.one_of(ints, st.floats(), st.booleans(), TEXT, SPECIAL, st.dates(),
                        st.datetimes().map(lambda d: d.replace(microsecond=0)))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(TEXT, st.sampled_from(OPTION_KEYS)), inner,
                                                      max_size=3)), max_leaves=6)


# small numbers only where a number sizes work (data, model widths, plugin iterations)
SMALL_VALUES = _toml_tree(st.integers(-3, 40)).filter(
    lambda v: not isinstance(v, float) or not math.isfinite(v) or abs(v) <= 40)
ANY_VALUES = _toml_tree(st.integers(-2**63, 2**63 - 1))
FIELDS = [f for f in RunConfig.__dataclass_fields__]
SIZED = {"model_opts", "data_opts", "optimizer_opts", "plugin_options", "plugins", "steps", "epochs", "regime"}

VALID = {
    "model": st.sampled_from(["mlp", "sam-mlp", "nope", "math:pi"]),
    "data": st.sampled_from(["synthetic", "digits", "nope"]),
    "loss": st.sampled_from(["ce", "mse", "hinge"]),
    "optimizer": st.sampled_from(["sgd", "adam", "adamw", "lion"]),
    "lr": st.one_of(st.floats(), st.integers(), st.sampled_from(["0.1", "fast"])),
    "batch_size": st.one_of(st.integers(-2, 100), st.sampled_from(["full", "8", "x", 8.0, 8.5])),
    "time_limit": st.one_of(st.floats(), st.integers(), st.sampled_from(["30m", "1s", "soon", "0"])),
    "lr_schedule": st.sampled_from(["constant", "cosine", "step:1:0.1", "step:x", "wiggly"]),
    "eval_schedule": SCHEDULE, "checkpoint_schedule": SCHEDULE,
    "plugins": st.one_of(st.lists(st.sampled_from(PLUGINS + ["zz-nope"]), max_size=3),
                         st.dictionaries(st.sampled_from(PLUGINS + ["active", "zz-nope"]), SMALL_VALUES, max_size=2)),
    "plugin_options": st.dictionaries(st.sampled_from(PLUGINS), st.dictionaries(
        st.sampled_from(OPTION_KEYS), st.one_of(SCHEDULE, SMALL_VALUES), max_size=2), max_size=2),
    "regime": st.dictionaries(st.sampled_from(["0", "1", "x", "-1"]), st.dictionaries(
        st.sampled_from(["lr", "momentum", "weight_decay", "optimizer", "beta"]), SMALL_VALUES, max_size=2),
        max_size=2),
    "steps": st.one_of(st.integers(-2, 2), st.floats(-2, 2), st.sampled_from(["1", "x", 1.5])),
    "epochs": st.one_of(st.integers(-2, 2), st.sampled_from(["1", "x", 1.5])),
    "on_nan": st.sampled_from(["stop", "continue", "sometimes"]),
    "device": st.sampled_from(["cpu", "cuda", "tpu"]),
    "seed": st.one_of(st.integers(), st.floats()),
}


def _field_value(key: str):
    name = key.replace("-", "_")
    guarded = SMALL_VALUES if name in SIZED else ANY_VALUES
    valid = VALID.get(name, guarded)
    return st.one_of(valid, valid, guarded)


KNOWN_ENTRY = st.sampled_from(FIELDS + [f.replace("_", "-") for f in FIELDS]).flatmap(
    lambda k: st.tuples(st.just(k), _field_value(k)))
CONFIG_ENTRY = st.one_of(
    KNOWN_ENTRY, KNOWN_ENTRY, KNOWN_ENTRY,
    st.tuples(st.one_of(TEXT, st.sampled_from(["learning_rate", "plugin", "Model", "lr "])), SMALL_VALUES),
)
BASE_CONFIG = {"data": "synthetic", "data_opts": {"n": 32, "dim": 4, "classes": 2}, "model_opts": {"widths": 4},
               "batch_size": 16, "progress": False}


@settings(max_examples=examples(250), **SETTINGS)
@given(entries=st.lists(CONFIG_ENTRY, min_size=1, max_size=4))
def test_fuzzed_config_file(cli, entries):
    data = dict(BASE_CONFIG)
    for key, value in entries:
        data[key] = value
    text = toml_dumps(data)
    assert _same(tomllib.loads(text), data), text  # the writer itself is right
    with fresh_dir() as cwd:
        (cwd / "exp.toml").write_text(text, encoding="utf-8")
        before = set(os.listdir(cwd))
        out_path = cwd / "out.zarr"
        full = ["run", "--config", cwd / "exp.toml", *GUARD, "--out", out_path]
        code, out, err = cli(*full)
        check_outcome(code, out, err, cwd, before, out_path, [*full, text])


@settings(max_examples=examples(100), **SETTINGS)
@given(content=st.one_of(st.binary(max_size=200), TEXT, st.text(max_size=200),
                         st.lists(st.sampled_from(["[", "]", "=", '"', "lr", "steps", " ", "\n", "1", "[[x]]",
                                                   "[plugins]", "a.b", "{", "}", ",", "'''", "0x", "nan"]),
                                  max_size=30).map("".join)))
def test_garbage_config_file(cli, content):
    with fresh_dir() as cwd:
        path = cwd / "exp.toml"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
        before = set(os.listdir(cwd))
        out_path = cwd / "out.zarr"
        full = ["run", "--config", path, *TINY, "--out", out_path]
        code, out, err = cli(*full)
        check_outcome(code, out, err, cwd, before, out_path, [*full, content])


@pytest.mark.parametrize("args", [["--loss", "torch.nn:MSELoss"], ["--loss", "builtins:max"],
                                  ["--model-opt", "in_features=3"], ["--model-opt", "out_features=0"]])
def test_shape_mismatch_is_bad_input(cli, tmp_path, args):
    before = set(os.listdir(tmp_path))
    code, out, err = cli("run", *TINY, *args, "--out", tmp_path / "out.zarr")
    check_outcome(code, out, err, tmp_path, before, tmp_path / "out.zarr", args)
    assert code == 2


def test_incompatible_plugins_are_bad_input(cli, tmp_path):
    before = set(os.listdir(tmp_path))
    code, out, err = cli("run", *TINY, "--plugin", "diffusion", "--out", tmp_path / "out.zarr")
    check_outcome(code, out, err, tmp_path, before, tmp_path / "out.zarr", ["--plugin", "diffusion"])
    assert code == 2


# -- 3. an existing store is never touched --------------------------------------------------

def test_existing_store_is_never_touched(cli, tmp_path):
    store = tmp_path / "r.zarr"
    code, _, err = cli("run", *TINY, "--steps", "2", "--checkpoint-schedule", "every:1", "--out", store)
    assert code == 0, err
    original = _listing(store)
    assert original

    @settings(max_examples=examples(80), **SETTINGS)
    @given(spelling=st.sampled_from([str(store), str(store) + "/", f"file://{store}", "r.zarr", "./r.zarr",
                                     "r.zarr/", f"{tmp_path}/./r.zarr"]),
           options=st.lists(CLI_OPTION.filter(lambda o: o[0] not in ("--resume", "--out")), max_size=4),
           tiny=st.booleans())
    def attempt(spelling, options, tiny):
        args = ["run", *(TINY if tiny else []), *[a for o in options for a in o], "--out", spelling]
        before = set(os.listdir(tmp_path))
        code, out, err = cli(*args)
        where = f"args={args!r}\nexit={code}\nstdout={out!r}\nstderr={err!r}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), where
        assert "Traceback" not in out + err, where
        assert set(os.listdir(tmp_path)) == before, where
        assert _listing(store) == original, where  # byte-identical

    attempt()
    code, out, err = cli("run", *TINY, "--out", store)
    assert code == 2 and "already exists" in err and "--resume" in err
    assert _listing(store) == original


# -- 4. checkpoints are plain tensors; nothing is written outside --out ---------------------

@settings(max_examples=examples(12), **SETTINGS)
@given(plugins=st.lists(st.sampled_from(["grad-norm", "sam", "entropy-sgd", "smoothout", "trajectory", "eos",
                                         "grad-stats", "layer-norms", "sharpness", "landscape"]),
                        max_size=3, unique=True),
       optimizer=st.sampled_from(["sgd", "adam", "adamw"]), momentum=st.sampled_from(["0", "0.9"]))
def test_checkpoints_load_weights_only_and_nothing_written_outside_out(cli, plugins, optimizer, momentum):
    owners = {"sam", "entropy-sgd", "smoothout"}
    if len(owners & set(plugins)) > 1:
        plugins = [p for p in plugins if p not in owners] + [sorted(owners & set(plugins))[0]]
    with fresh_dir() as cwd:
        outside = cwd / "outside"
        outside.mkdir()
        (cwd / "work").mkdir()
        os.chdir(cwd / "work")
        store = outside / "run.zarr"
        args = ["run", *TINY, "--steps", "2", "--checkpoint-schedule", "every:1", "--optimizer", optimizer,
                "--momentum", momentum, *[a for p in plugins for a in ("--plugin", p)], "--out", store]
        code, out, err = cli(*args)
        assert code == 0, (args, err)
        assert os.listdir(cwd / "work") == []  # nothing in the working directory (no runs/)
        assert os.listdir(outside) == ["run.zarr"]  # only the --out path appears
        import zarr

        group = zarr.open_group(str(store), mode="r")["checkpoints"]
        names = sorted(group.array_keys())
        assert names, "no checkpoint written"
        for name in names:
            raw = group[name][:].tobytes()
            state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
            assert {"step", "model", "optimizer"} <= set(state)
            assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
        os.chdir(cwd)


# -- non-finite numbers ---------------------------------------------------------------------

def test_every_numeric_plugin_option_rejects_nan_and_inf():
    """`-o sam.rho=nan`, `sharpness.tol=inf`, TOML `nan`: every int/float option of every
    installed plugin refuses non-finite values in one line naming it, unless it declares
    `nonfinite=True`."""
    from lscape.errors import UsageError
    from lscape.manager import build_registry, get_plugin_manager

    checked = 0
    for name, entry in sorted(build_registry(get_plugin_manager()).activatable().items()):
        for option in entry.obj.all_options():
            if option.type not in (int, float) or option.nonfinite:
                continue
            for value in ("nan", "inf", "-inf", float("nan"), float("inf")):
                with pytest.raises(UsageError, match=rf"bad value for {re.escape(name)}\.{option.name}: ") as e:
                    entry.obj(**{option.name: value})
                assert "\n" not in str(e.value)
            checked += 1
    assert checked > 50
