"""What a run store holds, summarised: for ``lscape show``, ``lscape compare`` and Jupyter.

``run_summary(reader)`` is a JSON-ready dict (numbers as numbers, ``None`` for non-finite
values); ``compare_row(reader, since)`` holds the late-phase statistics that ``lscape
compare`` tabulates; ``html(reader)`` is ``RunReader._repr_html_``.
"""

from __future__ import annotations

import html as _html
import math
from typing import Any

import numpy as np

__all__ = ["last_finite", "series_summary", "run_summary", "progress_of", "latest_checkpoint", "compare_row",
           "until_loss_of", "loss_match_warnings",
           "html", "LATE_FRACTION"]

#: the late phase of a series, for "mean over the last 10%"
LATE_FRACTION = 0.1
#: a last value with more elements than this is shown cut (JSON: the first this many)
MAX_ELEMENTS = 64
#: arrays that describe a measurement rather than the measured quantity
BOOKKEEPING = ("step", "time", "epoch")


def number(value: Any) -> Any:
    """A numpy value as a JSON number (``None`` for NaN/inf), list, bool or text."""
    if isinstance(value, np.ndarray):
        flat = value.ravel()[:MAX_ELEMENTS]
        return [number(v) for v in flat]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def last_finite(values: np.ndarray) -> tuple[int | None, Any]:
    """``(row, value)`` of the last row with a finite entry (float arrays; for the others the
    last row); ``(None, None)`` when there is none. Sparse series such as ``eval_loss``
    (NaN between evaluations) thus show their last evaluation, not ``nan``."""
    if values.ndim == 0 or values.shape[0] == 0:
        return None, None
    if values.dtype.kind != "f":
        return values.shape[0] - 1, values[-1]
    ok = np.isfinite(values.reshape(values.shape[0], -1)).any(axis=1)
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return None, None
    return int(rows[-1]), values[rows[-1]]


def series_summary(values: np.ndarray) -> dict[str, Any] | None:
    """first/last/min/max of the finite entries of a 1-D float series and the mean over its
    last 10% of finite entries (at least one); None when it has no finite entry."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    late = v[-max(1, int(math.ceil(LATE_FRACTION * v.size))):]
    return {"first": float(v[0]), "last": float(v[-1]), "min": float(v.min()), "max": float(v.max()),
            "late_mean": float(late.mean()), "n": int(v.size)}


def latest_checkpoint(reader: Any) -> dict[str, Any] | None:
    """The checkpoint ``latest`` points to: ``{"name", "step", "epoch", "count"}``, or None."""
    root = reader.root
    if "checkpoints" not in root.group_keys():
        return None
    group = root["checkpoints"]
    names = sorted(group.array_keys())
    name = group.attrs.get("latest") or (names[-1] if names else None)
    if not name or name not in names:
        return None
    attrs = group[name].attrs.asdict()
    return {"name": name, "step": attrs.get("step"), "epoch": attrs.get("epoch"), "count": len(names)}


def progress_of(reader: Any) -> dict[str, Any]:
    """Steps done (the attribute once the run ended; else the training rows written) and the
    total the run is set to (None for a time limit)."""
    attrs = reader.attrs
    done = attrs.get("steps_done")
    if done is None and reader.has("train"):
        steps = reader.read("train").get("step")
        done = int(steps[-1]) + 1 if steps is not None and steps.size else 0
    total = attrs.get("total_steps")
    if total is None:
        total = (attrs.get("config") or {}).get("steps")
    return {"steps_done": done, "total_steps": total}


def run_summary(reader: Any) -> dict[str, Any]:
    """Everything ``lscape show --json`` prints."""
    attrs = reader.attrs
    groups: dict[str, Any] = {}
    for g in reader.groups():
        if g == "checkpoints":
            continue
        data = reader.read(g)
        steps = data.get("step")
        arrays: dict[str, Any] = {}
        for name, a in data.items():
            row, value = last_finite(a) if a.ndim else (None, a[()])
            info: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype), "last": number(value),
                                    "last_step": int(steps[row]) if row is not None and steps is not None
                                    and row < len(steps) else None}
            if isinstance(value, np.ndarray) and value.size > MAX_ELEMENTS:
                info["last_truncated"] = True
            if a.ndim == 1 and a.dtype.kind == "f" and name not in BOOKKEEPING:
                info["summary"] = series_summary(a)
            arrays[name] = info
        groups[g] = arrays
    progress = progress_of(reader)
    return {"path": reader.path, "status": reader.status, "lscape_version": attrs.get("lscape_version"),
            "start_time": attrs.get("start_time"), "end_time": attrs.get("end_time"), **progress,
            "error": attrs.get("error"), "config": attrs.get("config"), "plugins": attrs.get("plugins"),
            "extensions": attrs.get("extensions", []), "groups": groups,
            "checkpoints": sorted(reader.root["checkpoints"].array_keys())
            if "checkpoints" in reader.root.group_keys() else [],
            "latest_checkpoint": latest_checkpoint(reader)}


def format_value(value: Any) -> str:
    """A stored value (a ``number()`` result) as a short text."""
    if value is None:
        return "-"
    if isinstance(value, list):
        text = ", ".join(format_value(v) for v in value[:4])
        return f"[{text}{', ...' if len(value) > 4 else ''}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


#: characters one config value may take in `show` and the notebook view
SHORT_VALUE = 60


def short_value(value: Any, width: int = SHORT_VALUE) -> str:
    """A config value on one short line: an object's stored description (a whole model's, a
    DataLoader's or an optimizer's repr, recorded by attach/object runs) cut to its first line
    and ``width`` characters."""
    if value is None:
        return "-"
    text = str(value).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > width or first != text:
        first = first[: width - 1].rstrip() + "…"
    return first


def config_line(cfg: dict[str, Any]) -> str:
    """The one-line description of a run's workload, as `show` prints it."""
    s = short_value
    opts = cfg.get("model_opts")
    return (f"model {s(cfg.get('model'))}{' ' + s(opts) if opts else ''}  data {s(cfg.get('data'))}  "
            f"loss {s(cfg.get('loss'))}  optimizer {s(cfg.get('optimizer'))} lr {cfg.get('lr')}  "
            f"batch {cfg.get('batch_size')}  seed {cfg.get('seed')}  data seed {cfg.get('data_seed', 0)}  "
            f"plugins {', '.join(cfg.get('plugins') or [])}")


def steps_text(summary: dict[str, Any]) -> str:
    done, total = summary.get("steps_done"), summary.get("total_steps")
    if done is None:
        return "-"
    return f"{done}/{total}" if total else str(done)


# -- compare ---------------------------------------------------------------------------

def compare_row(reader: Any, since: int | None = None) -> dict[str, Any]:
    """Late-phase statistics of one run over the rows with step >= ``since`` (default: the
    last 10% of each quantity's measurements, at least one): median λ_max, median
    λ_max/(2/η) (the edge of stability is 1), median λ_max/SAM-edge, the train loss (mean
    over the window) and the last finite eval loss and accuracy."""
    done = progress_of(reader)["steps_done"] or 0
    row: dict[str, Any] = {"run": label_of(reader), "path": reader.path, "status": reader.status,
                           "steps": done, "since": since}
    cache: dict[str, dict[str, np.ndarray]] = {}

    def window(group: str, *names: str) -> list[np.ndarray] | None:
        """``[steps, values...]`` of ``group`` in the window (rows where all are finite)."""
        if group not in cache:
            cache[group] = reader.read(group) if reader.has(group) else {}
        data = cache[group]
        if "step" not in data or any(n not in data for n in names):
            return None
        columns = [np.asarray(data[n], dtype=float) for n in names]
        ok = np.all([np.isfinite(c) for c in columns], axis=0) if columns else np.ones(len(data["step"]), bool)
        if since is not None:
            ok &= data["step"] >= since
        else:
            rows = np.flatnonzero(ok)
            ok[:] = False
            ok[rows[-max(1, int(math.ceil(LATE_FRACTION * rows.size))):] if rows.size else []] = True
        return [data["step"][ok], *(c[ok] for c in columns)]

    def median(values: np.ndarray | None) -> float | None:
        return float(np.median(values)) if values is not None and values.size else None

    eos = window("eos", "lambda_max", "threshold_gd", "sam_edge")
    if eos is not None:
        steps, lam, gd, sam = eos
        row["lambda_max"] = median(lam)
        row["lambda_over_threshold_gd"] = median(lam / gd)  # the probe stores 2/η with each measurement
        row["lambda_over_sam_edge"] = median(lam / sam)
    else:
        sharp, train = window("sharpness", "lambda_max"), (cache.get("train") or reader.read("train")
                                                           if reader.has("train") else {})
        row["lambda_max"] = median(sharp[1]) if sharp is not None else None
        ratio = None
        if sharp is not None and "lr" in train and len(train["lr"]):
            ratio = sharp[1] * np.interp(sharp[0], train["step"], train["lr"]) / 2.0  # λ/(2/η) = λη/2
        row["lambda_over_threshold_gd"] = median(ratio)
        row["lambda_over_sam_edge"] = None
    loss = window("train", "loss")
    row["train_loss"] = float(loss[1].mean()) if loss is not None and loss[1].size else None
    for name in ("eval_loss", "eval_accuracy"):
        w = window("train", name)
        row[name] = float(w[1][-1]) if w is not None and w[1].size else None
    row.update(until_loss_of(reader))
    return row


def until_loss_of(reader: Any) -> dict[str, Any]:
    """A run's ``--until-loss`` target (None: it had none), whether it was reached (None:
    unknown, the run did not end by itself) and the loss its last check measured."""
    attrs = reader.attrs
    target = (attrs.get("config") or {}).get("until_loss")
    if target is None:
        return {"until_loss": None, "until_loss_reached": None, "until_loss_loss": None}
    stopped = attrs.get("stopped_by") if isinstance(attrs.get("stopped_by"), dict) else {}
    reached = attrs.get("until_loss_reached")
    if reached is None and stopped.get("until_loss") is not None:
        reached = "cap" not in stopped
    if reached is None and reader.status == "completed":  # a store from before the cap was said
        reached = False
    loss = stopped.get("loss")
    if loss is None and reader.has("until-loss"):
        values = reader.read("until-loss").get("loss")
        loss = float(values[-1]) if values is not None and len(values) else None
    return {"until_loss": float(target), "until_loss_reached": reached, "until_loss_loss": loss}


#: train losses further apart than this (relative to the smallest) are not a loss-matched comparison
LOSS_MATCH_TOLERANCE = 0.2


def loss_match_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """Why runs compared side by side (``compare_row``) are not at matched loss: different
    ``--until-loss`` targets, a target a run's cap kept it from, or (without targets) final
    train losses more than ``LOSS_MATCH_TOLERANCE`` apart."""
    if len(rows) < 2:
        return []
    out = []
    targets = {r["run"]: r.get("until_loss") for r in rows}
    if len({t for t in targets.values()}) > 1:
        listed = ", ".join(f"{run} {'none' if t is None else f'{t:g}'}" for run, t in targets.items())
        out.append(f"the runs stopped at different --until-loss targets ({listed}): they are not at matched loss")
    for r in rows:
        if r.get("until_loss") is not None and r.get("until_loss_reached") is False:
            loss = r.get("until_loss_loss")
            at = f" (its loss was {loss:.4g})" if isinstance(loss, float) else ""
            out.append(f"{r['run']} did not reach --until-loss {r['until_loss']:g}{at}: its cap came first, "
                       "so the runs are not at matched loss")
    if all(t is None for t in targets.values()):
        losses = [r.get("train_loss") for r in rows if isinstance(r.get("train_loss"), float)]
        if len(losses) == len(rows) and min(losses) > 0 and (max(losses) - min(losses)) / min(losses) > \
                LOSS_MATCH_TOLERANCE:
            out.append(f"the runs end at train losses from {min(losses):.4g} to {max(losses):.4g}: they are not "
                       "at matched loss (run them with the same --until-loss to compare them there)")
    return out


def label_of(reader: Any) -> str:
    """A run's short name: its store's name (``--name`` when the run had one)."""
    attrs = reader.attrs
    return str(attrs.get("name") or (attrs.get("config") or {}).get("name") or reader.name)


# -- Jupyter ---------------------------------------------------------------------------

def html(reader: Any) -> str:
    """An HTML table of a run: status, steps, latest checkpoint, groups, arrays, last values."""
    s = run_summary(reader)
    e = _html.escape
    ckpt = s["latest_checkpoint"]
    head = (f"<b>{e(s['path'])}</b> &nbsp; status: <b>{e(str(s['status']))}</b> &nbsp; steps: {e(steps_text(s))}"
            + (f" &nbsp; latest checkpoint: step {ckpt['step']}" if ckpt else ""))
    cfg = s.get("config") or {}
    s_ = short_value
    conf = (f"model {e(s_(cfg.get('model')))} · data {e(s_(cfg.get('data')))} · optimizer "
            f"{e(s_(cfg.get('optimizer')))} lr {e(str(cfg.get('lr')))} · batch {e(str(cfg.get('batch_size')))}"
            f" · seed {e(str(cfg.get('seed')))}")
    rows = []
    for g, arrays in s["groups"].items():
        for i, (name, info) in enumerate(arrays.items()):
            rows.append(f"<tr><td>{e(g) if i == 0 else ''}</td><td>{e(name)}</td>"
                        f"<td>{'×'.join(map(str, info['shape']))}</td><td>{e(info['dtype'])}</td>"
                        f"<td>{e(format_value(info['last']))}</td>"
                        f"<td>{'' if info['last_step'] is None else info['last_step']}</td></tr>")
    table = ("<table><thead><tr><th>group</th><th>array</th><th>shape</th><th>dtype</th><th>last value</th>"
             "<th>at step</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    error = f"<div>error: {e(s['error'])}</div>" if s.get("error") else ""
    return f"<div class='lscape-run'><div>{head}</div><div>{conf}</div>{error}{table}</div>"
