"""Turning names and ``module:factory`` strings into models, data, losses and optimizers."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from .batch import MODEL_LOSS, BatchAdapter
from .errors import UsageError, UserCodeError, did_you_mean, message_line
from .manager import Entry

__all__ = ["resolve", "build_model", "build_data", "build_loss", "build_adapter", "build_optimizer",
           "check_optimizer_params", "call_with_accepted", "store_imports", "require_trust"]


def resolve(spec: str, table: Mapping[str, Entry], kind: str) -> Any:
    """A registered name, or ``module:attribute`` imported; else a ``UsageError``."""
    if spec in table:
        return table[spec].obj
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except (ImportError, ValueError, TypeError) as e:  # "" and ".relative" are Value/TypeErrors
            raise UsageError(f"cannot import '{module_name}' for --{kind} {spec}: {message_line(e)}") from e
        except Exception as e:  # the module's own code raised while importing
            raise UserCodeError(f"module '{module_name}' (imported for --{kind} {spec})", e) from e
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise UsageError(f"'{module_name}' has no attribute '{attr}' (--{kind} {spec})")
            obj = getattr(obj, part)
        return obj
    known = ", ".join(sorted(table)) or "none"
    raise UsageError(f"unknown {kind} '{spec}'{did_you_mean(spec, table)} (known: {known}; or give module:factory)")


def call_with_accepted(fn: Callable, options: Mapping[str, Any], extra: Mapping[str, Any], what: str) -> Any:
    """Call ``fn(**options, **extra)`` passing only the ``extra`` keys its signature names.

    An option it does not accept is a ``UsageError`` naming the option; errors raised
    for bad values inside ``fn`` (``TypeError``/``ValueError``) become ``UsageError`` too.
    """
    try:
        sig = inspect.signature(fn)
        params = sig.parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, var_kw = {}, True
    if not var_kw:
        unknown = [k for k in options if k not in params]
        if unknown:
            accepted = ", ".join(n for n, p in params.items()
                                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or "none"
            raise UsageError(f"{what} has no option '{unknown[0]}' (options: {accepted})")
    kwargs = dict(options)
    for key, value in extra.items():
        # only what the signature names: a factory with **kwargs (torchvision's resnet18)
        # passes them on to a constructor that never asked for them
        if value is not None and key not in kwargs and key in params:
            kwargs[key] = value
    try:
        return fn(**kwargs)
    except UsageError:
        raise
    except (TypeError, ValueError) as e:  # most often a bad option value
        raise UsageError(f"{what}: {message_line(e)}") from e
    except Exception as e:  # RuntimeError, KeyError, OSError, ...: the user's code failed
        raise UserCodeError(f"factory {what}", e) from e


def build_data(spec: str, options: Mapping[str, Any], table: Mapping[str, Entry], seed: int) -> tuple[Dataset, Dataset | None]:
    """``(train, eval)`` from a data factory (a Dataset, or ``{"train": ..., "eval": ...}``),
    or from the objects themselves (``lscape.run(data=...)``: a Dataset, a DataLoader or such a dict)."""
    if not isinstance(spec, str):
        out, spec = data_objects(spec), f"<{type(spec).__name__} object>"
    else:
        factory = resolve(spec, table, "data")
        out = call_with_accepted(factory, options, {"seed": seed}, f"data '{spec}'")
    if isinstance(out, Mapping):
        if "train" not in out:
            raise UsageError(f"data '{spec}' returned a dict without a 'train' entry")
        train, evaluation = out["train"], out.get("eval", out.get("test"))
    else:
        train, evaluation = out, None
    if train is None:
        raise UsageError(f"data '{spec}' returned None, not a Dataset (does the factory end with a return?)")
    for name, ds in (("train", train), ("eval", evaluation)):
        if ds is not None and not hasattr(ds, "__getitem__") and not isinstance(ds, IterableDataset):
            raise UsageError(f"data '{spec}' gave a {name} set that is not a Dataset ({type(ds).__name__})")
    if isinstance(train, IterableDataset):
        return train, evaluation
    try:
        n = len(train)
    except TypeError:
        raise UsageError(f"data '{spec}' gave a training set without __len__ ({type(train).__name__}); "
                         "map-style datasets need one") from None
    except Exception as e:
        raise UserCodeError(f"data '{spec}' (its __len__)", e) from e
    if n == 0:
        raise UsageError(f"data '{spec}' has an empty training set")
    return train, evaluation


def build_model(spec: str, options: Mapping[str, Any], table: Mapping[str, Entry], train_set: Any) -> nn.Module:
    """An ``nn.Module`` from a factory, told the data's ``num_classes``/``input_shape``
    (or the module itself, given as an object)."""
    if isinstance(spec, nn.Module):
        model, spec = spec, f"<{type(spec).__name__} object>"
    else:
        factory = resolve(spec, table, "model")
        extra = {k: getattr(train_set, k, None) for k in ("num_classes", "input_shape", "output_dim")}
        model = call_with_accepted(factory, options, extra, f"model '{spec}'")
    if not isinstance(model, nn.Module):
        raise UsageError(f"model '{spec}' returned {type(model).__name__}, not an nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"model '{spec}' has no trainable parameters")
    return model


def build_loss(spec: str, table: Mapping[str, Entry]) -> Callable | None:
    """A loss callable; a class given as ``module:Class`` is instantiated. ``model`` (the
    model's own loss, ``output.loss``) gives None."""
    if spec == MODEL_LOSS or spec is None:
        return None
    obj = resolve(spec, table, "loss") if isinstance(spec, str) else spec
    if inspect.isclass(obj):
        try:
            obj = obj()
        except TypeError as e:
            raise UsageError(f"loss '{spec}' cannot be built without arguments: {e}") from e
    if not callable(obj):
        raise UsageError(f"loss '{spec}' is not callable")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have none: trust them
        sig = None
    if sig is not None:
        try:
            sig.bind(None, None)
        except TypeError:
            raise UsageError(f"loss '{spec}' must take (output, target); its signature is {sig}") from None
    return obj


def build_adapter(spec: str | None, loss_fn: Callable | None, table: Mapping[str, Entry] | None = None) -> BatchAdapter:
    """The run's batch→loss adapter; ``spec`` a ``module:fn`` (or a registered name) with
    ``fn(model, batch) -> (output, target)``, or None for tuples and dicts."""
    fn = None
    if spec is not None:
        fn = resolve(spec, table or {}, "adapter")
        if not callable(fn):
            raise UsageError(f"adapter '{spec}' is not callable")
    return BatchAdapter(loss_fn, fn)


def build_optimizer(spec: str, params: Any, lr: float, momentum: float, weight_decay: float,
                    options: Mapping[str, Any], table: Mapping[str, Entry]) -> torch.optim.Optimizer:
    """A registered optimizer factory, or any ``module:Class`` subclass of ``Optimizer``.

    A class gets ``lr`` and, when its constructor takes them and they are non-zero,
    ``momentum`` and ``weight_decay``; ``options`` are passed as keyword arguments.
    """
    if isinstance(spec, torch.optim.Optimizer):  # an optimizer object over the model's parameters
        return spec
    obj = resolve(spec, table, "optimizer") if isinstance(spec, str) else spec
    what = f"optimizer '{spec}'" if isinstance(spec, str) else f"optimizer <{getattr(spec, '__name__', type(spec).__name__)}>"
    if not isinstance(spec, str) and not inspect.isclass(obj) and callable(obj):
        # a factory given as an object: factory(params) -> Optimizer
        try:
            optimizer = obj(params)
        except Exception as e:
            raise UserCodeError(what, e) from e
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"{what} returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        return optimizer
    if inspect.isclass(obj):
        if not issubclass(obj, torch.optim.Optimizer):
            raise UsageError(f"{what} is not a torch.optim.Optimizer subclass")
        factory = _bound(obj.__init__, 3, lambda **kw: obj(params, lr=lr, **kw))
        extra = {"momentum": momentum or None, "weight_decay": weight_decay or None}
    else:
        factory = _bound(obj, 4, lambda **kw: obj(params, lr, momentum, weight_decay, **kw))
        extra = {}
    optimizer = call_with_accepted(factory, options, extra, what)
    try:
        step = inspect.signature(optimizer.step).parameters.get("closure")
    except (AttributeError, TypeError, ValueError):
        step = None
    if step is not None and step.default is inspect.Parameter.empty and step.kind is not step.VAR_POSITIONAL:
        raise UsageError(f"{what} needs a closure in step() (like LBFGS), which the training step does not pass")
    return optimizer


def check_optimizer_params(optimizer: torch.optim.Optimizer, model: nn.Module, what: str = "the optimizer") -> None:
    """An optimizer given as an object must update the model being trained: refused in one line
    when none of its parameters is the model's (one made over another model, or over a copy)
    or when some are not the model's. Holding only some of the model's trainable parameters
    is allowed: those it lacks stay as they are, as with plain PyTorch (fine-tuning a head)."""
    own = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in held if id(p) not in own]
    if held and len(foreign) == len(held):
        raise UsageError(f"{what} updates none of the model's parameters (it was made over another model's, "
                         "or a copy's): make it over model.parameters()")
    if foreign:
        raise UsageError(f"{what} holds {len(foreign)} of {len(held)} parameters that are not the model's: "
                         "make it over model.parameters()")


def _bound(signature_of: Callable, skip: int, call: Callable) -> Callable:
    """``call`` with the signature of ``signature_of`` minus its first ``skip`` parameters,
    so that ``call_with_accepted`` can check option names against it."""
    try:
        sig = inspect.signature(signature_of)
        call.__signature__ = sig.replace(parameters=list(sig.parameters.values())[skip:])  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    return call


#: RunConfig fields whose ``module:attribute`` values are imported when a run is built
IMPORT_FIELDS = ("model", "data", "loss", "optimizer", "adapter")


def store_imports(cfg: Any, known_plugins: Any = None, given: Mapping[str, Any] | None = None) -> list[str]:
    """What building ``cfg`` (a config read from a store) would import: its ``module:attr``
    specs and plugins named by import path (``known_plugins``: the installed plugin names;
    None skips plugins), except what the user named the same way (``given``)."""
    given = given or {}
    out = []
    for name in IMPORT_FIELDS:
        spec = getattr(cfg, name, None)
        if isinstance(spec, str) and ":" in spec and given.get(name) != spec and not spec.startswith("<object "):
            out.append(f"--{name} {spec}")
    if known_plugins is not None:
        named = set(given.get("plugins") or ())
        out += [f"--plugin {p}" for p in cfg.plugins or () if p not in known_plugins and p not in named]
    return out


def require_trust(path: Any, imports: list[str], trusted: bool, attrs: Mapping[str, Any] | None = None) -> None:
    """Refuse, in one line, to import code that only a store names, unless ``trusted`` or the
    store's config is signed by this user (``attrs``: its root attributes; ``lscape.trust``)."""
    from .trust import SIGNATURE_ATTR, signed_by_user

    if not imports or trusted or (attrs is not None and signed_by_user(attrs)):
        return
    why = "a store can come from anyone"
    if attrs is not None and SIGNATURE_ATTR in attrs:
        why = "its config was changed since it was written, or another user's lscape wrote it"
    raise UsageError(f"{path} asks to import {', '.join(imports)}; {why}, so lscape imports only code you name "
                     "or stores you wrote: add --trust-store if you trust this store "
                     "(or give the same names on the command line)")


class CollatedDataset(Dataset):
    """A data set that carries the collate function of the DataLoader it came from (a
    HuggingFace data collator that pads, say); lscape's loader uses it."""

    def __init__(self, dataset: Any, collate_fn: Callable):
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # num_classes, input_shape, ... of the data set
        if name in ("dataset", "collate_fn"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def data_objects(obj: Any) -> Any:
    """Datasets from objects: a DataLoader gives its dataset (with its collate function;
    lscape draws the order itself, seeded and checkpointed), a dict maps train/eval."""
    from torch.utils.data import DataLoader, default_collate

    if isinstance(obj, Mapping):
        return {k: data_objects(v) for k, v in obj.items()}
    if isinstance(obj, DataLoader):
        if obj.collate_fn is not None and obj.collate_fn is not default_collate and \
                getattr(obj.collate_fn, "__name__", "") != "default_collate":
            return CollatedDataset(obj.dataset, obj.collate_fn)
        return obj.dataset
    return obj


def describe_object(obj: Any) -> str:
    """What the stored config says of an object given to ``lscape.run`` (class and repr)."""
    text = " ".join(repr(obj).split())
    return f"<object {type(obj).__module__}.{type(obj).__qualname__}: {text[:300]}>"
