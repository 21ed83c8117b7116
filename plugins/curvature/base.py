"""What every curvature probe shares: the options that say which matrix (``kind`` from the
operator registry), over which parameters and in which mode; warm starts; the shared
measurement subset; the checks before the store exists; the operator itself.

The library (:mod:`lscape.curvature`) raises ``ValueError`` in its own words; this layer
says the same in the user's words (options and flags) as :class:`lscape.errors.UsageError`.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from lscape import Option, Probe
from lscape.batch import as_adapter
from lscape.curvature import (
    METHODS,
    CurvatureOperator,
    HessianOperator,
    NotSteppedError,
    collect_operators,
    operator_class,
    operator_names,
)
from lscape.data import derived_seed
from lscape.errors import UsageError
from lscape.params import select_parameters

__all__ = ["CurvatureProbe", "WarmStart", "RecordsProducts", "record_products", "update_attrs",
           "CURVATURE_OPTIONS", "LANCZOS_OPTIONS", "FD_OPTIONS", "SHARDED_NOTE", "lanczos_memory", "memory_attrs", "announce_cost", "settle_cost", "memory_size", "KIND_CHOICES", "WHICH_OUTPUT", "make_operator",
           "curvature_batches", "check_curvature", "selected_dim", "parse_groups", "groups_of", "loss_adapter", "usage_error"]

#: the array a selected extreme eigenvalue is stored as
WHICH_OUTPUT = {"LA": "lambda_max", "SA": "lambda_min", "LM": "lambda_abs_max"}


class KindChoices(Sequence):
    """The registered curvature matrices (:mod:`lscape.curvature.registry`), read when asked,
    so that a matrix registered after this module was imported is a valid ``kind``. A name
    not (yet) registered is looked up once more after calling every plugin's
    ``register_curvature_operators`` hook (built-in and installed plugins)."""

    _collected = False

    def _names(self) -> tuple[str, ...]:
        if not KindChoices._collected:
            self.collect()
        return operator_names()

    @staticmethod
    def collect() -> None:
        from lscape.manager import get_plugin_manager

        KindChoices._collected = True
        collect_operators(get_plugin_manager())

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        if name in operator_names():
            return True
        self.collect()
        return name in operator_names()

    def __repr__(self) -> str:
        return f"KindChoices({', '.join(self._names())})"


#: the ``kind`` choices of every curvature probe: the operator registry, live
KIND_CHOICES = KindChoices()

#: Options every curvature probe shares: which matrix, over which parameters, in which mode.
CURVATURE_OPTIONS = (
    Option("mode", str, "eval", "module mode during products (eval: running BN stats, no dropout)",
           choices=("eval", "train")),
    Option("params", str, None, "parameter subset: comma-separated glob patterns on names (default: all)"),
    Option("groups", str, None, "per-group spectra: 'blocks=PATTERN' (one group per module matching, e.g. "
           "blocks=layer*) or 'NAME=PATTERN[,PATTERN];NAME=...' (stored with a group dimension)"),
    Option("kind", str, "hessian", "matrix: the Hessian, the Gauss-Newton matrix, the Monte-Carlo Fisher "
           "(cross-entropy), the empirical Fisher, or any registered curvature matrix", choices=KIND_CHOICES),
    Option("method", str, "auto", "Hessian-vector products (auto: double backward where it agrees with finite "
           "differences on the first product, else forward-over-reverse, else finite differences)",
           choices=METHODS),
    Option("chunk", int, None, "split batches into chunks of at most this many samples (memory)", minimum=1),
)


def memory_size(value: Any) -> int:
    """Bytes from ``2GB``, ``512MiB``, ``1.5G`` or a plain number of bytes (see :func:`lscape.limits.parse_size`)."""
    from lscape.limits import parse_size

    return parse_size(value)


memory_size.__name__ = "memory size (e.g. 2GB, 512MiB)"

#: Options of the probes that run Lanczos (sharpness, hessian): where the basis lives and how
#: much memory it may take (``lscape.curvature.lanczos``'s ``basis_device`` and ``memory_budget``).
LANCZOS_OPTIONS = (
    Option("basis_device", str, None, "device of the Lanczos basis (default: the model's; cpu keeps it in host "
           "memory while products run on the GPU)"),
    Option("memory_budget", memory_size, None, "memory for the Lanczos basis (e.g. 2GB, 512MiB; default 256MiB, or a "
           "quarter of the basis device's memory if less); above it Lanczos thick-restarts in place (same "
           "accuracy, more products)"),
)


#: Options of the probes whose products may be finite differences (sharpness, hessian): the step
#: (``lscape.curvature.products.fd_step``), for the ladder's check, method=finite-difference and
#: every product on a sharded model
FD_OPTIONS = (
    Option("fd_eps", float, None, "finite-difference step: the parameters move by fd_eps along every direction "
           "(ε = fd_eps/‖v‖; default the per-dtype rule u^{1/3}·max(1, rms θ)/‖v‖); used by method=finite-difference, "
           "the auto check, and on a sharded model (--strategy fsdp)", within="(0, 1)"),
)


def lanczos_memory(probe: Probe) -> dict[str, Any]:
    """The ``basis_device`` and ``memory_budget`` keywords of :func:`lscape.curvature.lanczos` from the probe's options."""
    opts = probe.opts
    return {"basis_device": getattr(opts, "basis_device", None), "memory_budget": getattr(opts, "memory_budget", None)}


def memory_attrs(result: Any, op: CurvatureOperator | None = None) -> dict[str, Any] | None:
    """What a Lanczos result held (:attr:`EigenResult.memory`), with the other inputs of the
    peak formula (model + autograd graph of one product + m vectors): ``dim``,
    ``param_bytes`` (the selected parameters) and ``product_peak_bytes`` (CUDA: the peak
    allocated during the last product, model and graph included; None on the CPU)."""
    memory = getattr(result, "memory", None)
    if memory is None:
        return None
    out = dict(memory)
    if op is not None:
        out["dim"] = int(op.dim)
        out["param_bytes"] = int(op.dim) * torch.empty(0, dtype=op.dtype).element_size()
        out["product_peak_bytes"] = getattr(op, "peak_memory", None)
    return out


def parse_groups(spec: str | None, model: Any) -> list[tuple[str, list[str]]]:
    """``[(group name, [parameter names])]`` from a ``groups`` option (see CURVATURE_OPTIONS).

    ``blocks=PATTERN``: the parameters under each module whose dotted name matches PATTERN
    (the shortest matching prefix of each parameter name), in registration order;
    ``NAME=PATTERN,...;NAME=...``: explicit groups of glob patterns. Trainable parameters only.
    """
    if not spec:
        return []
    spec = spec.strip()
    names = [n for n, _ in select_parameters(model)]
    groups: dict[str, list[str]] = {}
    if spec.startswith("blocks="):
        pattern = spec[len("blocks="):].strip()
        if not pattern:
            raise UsageError("groups=blocks=PATTERN needs a pattern, e.g. groups=blocks=layer*")
        for n in names:
            parts = n.split(".")
            for d in range(1, len(parts)):
                prefix = ".".join(parts[:d])
                if fnmatch.fnmatchcase(prefix, pattern):
                    groups.setdefault(prefix, []).append(n)
                    break
        if not groups:
            raise UsageError(f"groups=blocks={pattern} matches no module holding trainable parameters")
        return list(groups.items())
    for part in spec.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise UsageError(f"groups: {part.strip()!r} is not NAME=PATTERN (or blocks=PATTERN)")
        name, patterns = (t.strip() for t in part.split("=", 1))
        try:
            chosen = [n for n, _ in select_parameters(model, include=[p for p in patterns.split(",") if p] or None)] \
                if patterns else []
        except ValueError:  # a pattern that matches nothing
            chosen = []
        if not name or not chosen:
            raise UsageError(f"groups: group {name or '?'} selects no trainable parameter ({patterns})")
        groups[name] = chosen
    return list(groups.items())


class WarmStart:
    """Probe mixin: keeps the eigenvectors of the previous measurement, and the next few Ritz
    vectors, so the next Lanczos starts from them (option ``warm_start``; Lanczos also adds a
    fresh random direction and verifies, so a swap or a near-tie is not hidden), and saves
    them in checkpoints so a resumed run starts where it stopped."""

    _v0: torch.Tensor | None = None

    def warm_vectors(self, op: CurvatureOperator, key: str | None = None) -> torch.Tensor | None:
        """The previous start block, if warm starts are on and it fits ``op``."""
        v0 = self._v0.get(key) if isinstance(self._v0, dict) else (self._v0 if key is None else None)
        fits = self.opts.warm_start and v0 is not None and v0.shape[-1] == op.dim
        if getattr(op, "sharded", False):
            # each rank holds its own slices: every rank must start from the same number of rows (a
            # resumed run's checkpoint keeps rank 0's slices, which may not fit the others), or
            # the ranks' products would not match
            rows = float(len(v0)) if fits and v0.ndim == 2 else 1.0
            unfit, most, fewest = _max_over_ranks(torch.tensor([0.0 if fits else 1.0, rows, -rows],
                                                               dtype=torch.float64))
            fits = unfit == 0.0 and most == -fewest
        return v0 if fits else None

    def keep_vectors(self, result: Any, key: str | None = None) -> None:
        block = result.warm_start() if hasattr(result, "warm_start") else result.eigenvectors
        block = block.detach().clone()
        if key is None and not isinstance(self._v0, dict):
            self._v0 = block
            return
        if not isinstance(self._v0, dict):
            self._v0 = {} if self._v0 is None else {None: self._v0}
        self._v0[key] = block

    def state_dict(self) -> dict[str, Any]:
        return {"v0": self._v0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._v0 = state.get("v0")


def _max_over_ranks(values: torch.Tensor) -> list[float]:
    out = values.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return [float(x) for x in out]


def loss_adapter(ctx: Any) -> Any:
    """The run's batch→loss adapter (``ctx.adapter``), or its plain loss where there is none."""
    return getattr(ctx, "adapter", None) or ctx.loss_fn


def usage_error(probe: Probe, err: ValueError) -> UsageError:
    """A library error about an operator argument, said in the probe's options and the run's flags."""
    argument = getattr(err, "argument", None)
    if argument in ("params", "kind", "method", "chunk", "mode", "mc_samples", "fd_eps", "max_params"):
        return UsageError(f"bad value for {probe.name}.{argument}: {err}")
    if argument == "optimizer":
        kind = getattr(probe.opts, "kind", None)
        return UsageError(f"bad value for {probe.name}.kind{f' ({kind})' if kind else ''}: {err} "
                          f"(the run's optimizer is --optimizer)")
    if argument == "loss_fn":
        return UsageError(f"{probe.name}: {err} (the run's loss is --loss, e.g. --loss ce)")
    return UsageError(f"{probe.name}: {err}")


def make_operator(probe: Probe, ctx: Any, batches: list[Any], params: Any = None, **overrides: Any) -> CurvatureOperator:
    """The curvature operator a probe's options describe, on ``batches`` at the current θ
    (over ``params`` when given: one group of a per-group measurement); ``overrides`` replace
    arguments the options would give. Bad arguments are :class:`UsageError` naming the option."""
    opts = probe.opts
    arguments = dict(params=params if params is not None else getattr(opts, "params", None),
                     mode=opts.mode, method=getattr(opts, "method", "auto"), kind=getattr(opts, "kind", "hessian"),
                     chunk=getattr(opts, "chunk", None),
                     seed=derived_seed(getattr(getattr(ctx, "config", None), "seed", 0), "curvature", probe.name) % (2**31))
    arguments.update(overrides)
    if operator_class(arguments["kind"]).needs_optimizer:
        arguments.setdefault("optimizer", getattr(ctx, "optimizer", None))
    try:
        op = HessianOperator(ctx.model, loss_adapter(ctx), batches, **arguments)
        if "fd_eps" not in overrides and FD_OPTIONS[0] in probe.options and opts.fd_eps is not None:
            op.fd_length = float(opts.fd_eps)  # a step length along every direction (fd_step: ε = fd_eps/‖v‖)
    except NotSteppedError:
        raise  # not bad input: the optimizer has not updated yet (CurvatureProbe skips the measurement)
    except ValueError as err:
        raise usage_error(probe, err) from err
    made = getattr(probe, "made_operators", None)
    if made is not None:  # a RecordsProducts probe: its attrs say which product was used
        made.append(op)
        announce_cost(probe, ctx, op)
    return op


def record_products(probe: Probe, ctx: Any, operators: Sequence[CurvatureOperator]) -> dict[str, Any]:
    """Write the product method of ``operators`` (those of one measurement) and its error into
    the attrs of every store group the probe has written: ``hvp_method`` (the method, or
    several joined by commas), ``hvp_method_reason`` (why: asked for, or the ladder's
    finding), ``hvp_product_error`` (the largest relative error estimate of finite-difference
    products over the run so far; None for autograd products) and ``hvp_check`` (the
    ladder's measurements on the first product: relative disagreement and tolerance per
    autograd product, the finite-difference error estimate). Returns the attrs."""
    described = [op.describe() for op in operators if op.num_products]
    if not described:
        return {}
    methods = list(dict.fromkeys(d["method"] for d in described))
    errors = [d["product_error"] for d in described if d["product_error"] is not None]
    previous = getattr(probe, "product_attrs", None) or {}
    if previous.get("hvp_product_error") is not None:
        errors.append(previous["hvp_product_error"])
    attrs = {"hvp_method": ",".join(methods), "hvp_method_reason": described[0]["method_reason"],
             "hvp_product_error": max(errors) if errors else None,
             "hvp_check": next((d["check"] for d in described if d["check"]), None)}
    probe.product_attrs = attrs
    update_attrs(probe, attrs)
    error = attrs["hvp_product_error"]
    if error is not None and error > FD_WARN and not getattr(probe, "_fd_warned", False) and \
            getattr(ctx, "is_main", True):
        probe._fd_warned = True
        step = f"-o {probe.name}.fd_eps=1e-4" if FD_OPTIONS[0] in getattr(probe, "options", ()) else "a smaller step"
        warnings.warn(f"{probe.name}: finite-difference Hessian products are inaccurate here (estimated relative "
                      f"error {error:.2g}, stored as hvp_product_error): eigenvalues may be off by about that "
                      f"fraction of the largest; try {step}, or float64", RuntimeWarning, stacklevel=2)
    return attrs


#: a finite-difference error estimate above this is said once per probe (besides the attrs)
FD_WARN = 1e-2


def update_attrs(probe: Probe, attrs: dict[str, Any]) -> None:
    """Write ``attrs`` into every store group the probe has written (main rank only); a value
    that group already holds from an earlier call is not written again (each attribute write
    is a store operation: measured every step, they cost more than a small model's products)."""
    written = probe.__dict__.setdefault("_attrs_written", {})
    for writer in probe.opened_groups():  # the groups it wrote (main rank only)
        changed = {k: v for k, v in attrs.items() if written.get((id(writer), k), _UNSET) != v}
        if changed:
            writer.group.attrs.update(changed)
            written.update({(id(writer), k): v for k, v in changed.items()})


_UNSET = object()


class RecordsProducts:
    """Probe mixin: after each measurement, the product method of the operators it made with
    :func:`make_operator` and the product error go into the probe's store attrs
    (:func:`record_products`), with whatever the measurement put in ``measure_attrs``
    (e.g. ``lanczos_memory``). Its cost: ``cost_model`` (text, shown by ``lscape plugins
    NAME``) and :meth:`planned_products` (products per measurement from the options), said in
    one line at the first product of the first measurement (:func:`announce_cost`)."""

    made_operators: list[CurvatureOperator] | None = None
    product_attrs: dict[str, Any] | None = None
    measure_attrs: dict[str, Any] | None = None
    #: (seconds, rows) of the first products, timed by :func:`announce_cost`
    first_products: list[tuple[float, int]] | None = None
    #: products per measurement as a formula of the options (``lscape plugins NAME``)
    cost_model: str | None = None

    def planned_products(self, ctx: Any) -> dict[str, int] | None:
        """Products one measurement spends at most, by part, from the options (None: not known ahead)."""
        return None

    @classmethod
    def describe(cls) -> dict[str, Any]:
        info = super().describe()
        if cls.cost_model:
            info["cost"] = cls.cost_model
        return info

    def run_measure(self, ctx, state) -> dict[str, Any]:
        self.made_operators = []
        self.measure_attrs = {}
        try:
            values = super().run_measure(ctx, state)
            settle_cost(self, ctx)
            record_products(self, ctx, self.made_operators)
            if self.measure_attrs:
                update_attrs(self, self.measure_attrs)
        finally:
            self.made_operators = None
        return values


#: products timed before the cost of a measurement is said (the first one is the setup)
TIMED_PRODUCTS = 4


def announce_cost(probe: Probe, ctx: Any, op: CurvatureOperator) -> None:
    """Time ``op``'s first products and say, once per probe and run, what a measurement will
    cost: ``hessian: ~N products per measurement (~T s at this model size, measured on the
    first product)`` on stderr (:meth:`lscape.limits.ProbeTimer.cost`). N is the probe's
    :meth:`RecordsProducts.planned_products` (an upper bound). The first product also builds
    what later ones reuse (the cached graph, the product method's check), so it is timed as
    setup and the fastest of the next few as the price of each further product; a
    measurement with fewer products is said at its end (:func:`settle_cost`)."""
    timer = getattr(ctx, "probe_timer", None)
    if timer is None or not hasattr(timer, "cost") or timer.announced(probe.name):
        return

    def timed(name: str, rows: Any):
        method = getattr(op, name)

        def call(v: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = method(v)
            seconds = time.perf_counter() - start
            if not timer.announced(probe.name):
                probe.first_products = [*(getattr(probe, "first_products", None) or []),
                                        (seconds, max(rows(v), 1))]
                if len(probe.first_products) >= TIMED_PRODUCTS:
                    for attr in ("matvec", "matmat"):  # back to the class's methods
                        op.__dict__.pop(attr, None)
                    settle_cost(probe, ctx)
            return out

        return call

    op.matvec = timed("matvec", lambda v: 1)
    op.matmat = timed("matmat", lambda v: v.shape[0])


def settle_cost(probe: Probe, ctx: Any) -> None:
    """Say the cost from the products :func:`announce_cost` timed (also at the end of a
    measurement that made fewer): the first as setup, the fastest later one as the price of
    each further product (the first process-wide products also pay one-time warm-ups)."""
    timer = getattr(ctx, "probe_timer", None)
    timed = getattr(probe, "first_products", None)
    if timer is None or not hasattr(timer, "cost") or not timed or timer.announced(probe.name):
        return
    planner = getattr(probe, "planned_products", None)
    planned = planner(ctx) if planner else None
    if len(timed) == 1:
        timer.cost(probe.name, planned, timed[0][0] / timed[0][1])
    else:
        timer.cost(probe.name, planned, min(t / n for t, n in timed[1:]), setup=timed[0][0])


def curvature_batches(probe: Probe, ctx: Any, state: Any) -> list[Any]:
    """The probe's batches; with ``data=subset`` one fixed subset shared by all curvature probes.

    ``sharpness``, ``hessian`` and ``hessian-exact`` then describe the same matrix, so their
    numbers can be compared (λ_max from Lanczos against the dense spectrum, say).
    """
    if probe.opts.data != "subset":
        return Probe.batches(probe, ctx, state)
    return probe.measurement_subset(ctx, purpose="curvature")


def selected_dim(probe: Probe, ctx: Any) -> int:
    """The number of parameters the probe's ``params`` option selects (a pattern that selects
    nothing is bad input naming the option)."""
    try:
        return sum(p.numel() for _, p in select_parameters(ctx.model, getattr(probe.opts, "params", None)))
    except ValueError as err:
        raise UsageError(f"bad value for {probe.name}.params: {err}") from None


def check_curvature(probe: Probe, ctx: Any) -> None:
    """Bad curvature options are bad input before the store exists (groups, k, kind vs loss)."""
    from lscape.limits import require_at_most, require_memory

    probe._groups = parse_groups(getattr(probe.opts, "groups", None), ctx.model)
    basis_device = getattr(probe.opts, "basis_device", None)
    if basis_device is not None:
        try:
            torch.empty(0, device=basis_device)
        except (RuntimeError, ValueError, AssertionError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "not available"
            raise UsageError(f"bad value for {probe.name}.basis_device: {basis_device!r} ({reason}); "
                             f"use cpu or a device this machine has") from None
    k = getattr(probe.opts, "k", None)
    if k is not None:
        dim = selected_dim(probe, ctx)
        require_at_most(k, dim, f"{probe.name}.k", "the number of selected parameters")
        # the Lanczos basis: about 3k vectors of the parameters' size (block, spare, restarts)
        require_memory(3 * k * dim * 4, f"{probe.name}: a Lanczos basis for k={k} over {dim} parameters",
                       f"{probe.name}.k", ctx.device)
    adapter = loss_adapter(ctx)
    kind = getattr(probe.opts, "kind", "hessian")
    if kind != "hessian" and not getattr(adapter, "separable", True):
        raise UsageError(f"{probe.name}: kind={kind} needs a loss of the model's output (a separable "
                         f"loss); name a loss (--loss ce) instead of --loss model, or use kind=hessian")
    try:
        cls = operator_class(kind)
        cls.check_loss(as_adapter(adapter))
        if cls.needs_optimizer:  # e.g. kind=preconditioned with an optimizer it has no rule for
            cls.check_optimizer(getattr(ctx, "optimizer", None))
            probe._matrix_attrs = cls.describe_matrix(ctx.optimizer)
    except ValueError as err:  # e.g. kind=fisher without a cross-entropy loss
        raise usage_error(probe, err) from None


#: why a curvature probe that does not declare ``sharded`` refuses ``--strategy fsdp``
SHARDED_NOTE = ("its products need torch.autograd.grad through the model (double backward, torch.func), which "
                "fails on FSDP2's sharded parameters; sharpness and hessian run sharded (finite differences of "
                "gradients, docs/scaling.md)")


def sharded_refusal(probe: Probe) -> str | None:
    """What a sharded curvature probe's options ask that a sharded model cannot give (None: nothing)."""
    opts = probe.opts
    kind = getattr(opts, "kind", "hessian")
    if kind != "hessian":
        return f"{probe.name}.kind={kind} (only the Hessian is available sharded)"
    method = getattr(opts, "method", "auto")
    if method not in ("auto", "finite-difference"):
        return f"{probe.name}.method={method} (autograd cannot differentiate twice through FSDP2's gathered " \
               f"parameters; products are finite differences)"
    if getattr(opts, "groups", None):
        return f"{probe.name}.groups={opts.groups} (per-group spectra are not measured sharded)"
    return None


def groups_of(probe: Probe, ctx: Any) -> list[tuple[str, list[str]]]:
    """The probe's parameter groups (option ``groups``), parsed once."""
    if getattr(probe, "_groups", None) is None:
        probe._groups = parse_groups(getattr(probe.opts, "groups", None), ctx.model)
    return probe._groups


class CurvatureProbe(RecordsProducts, Probe):
    """Base of the curvature probes: measured by default on the fixed subset shared by every
    curvature probe, after the backward pass, with :data:`CURVATURE_OPTIONS` (which matrix,
    parameters, groups, mode, product method, chunk). Probes that warm-start Lanczos add the
    :class:`WarmStart` mixin (``class Sharpness(WarmStart, CurvatureProbe)``).

    A subclass sets ``name``, ``options = CURVATURE_OPTIONS + (...)``, ``outputs`` and
    ``measure``, in which ``self.operator(ctx, batches)`` is the matrix the options describe
    and ``self.groups(ctx)`` the parameter groups (``[]`` without ``groups``). The product
    method the operators used and its error are stored in the group's attrs
    (:class:`RecordsProducts`).
    """

    data = "subset"
    at = "after_backward"
    options = CURVATURE_OPTIONS
    # autograd.grad fails on FSDP2's DTensor parameters: probes whose products can be finite
    # differences of gradients (sharpness, hessian) set sharded = True; the others say why not
    sharded_note = SHARDED_NOTE
    _groups: list[tuple[str, list[str]]] | None = None
    #: what the matrix is (``matrix``, ``preconditioner_rule``, ...), for a derived ``kind``
    _matrix_attrs: dict[str, str] | None = None

    def check(self, ctx) -> None:
        check_curvature(self, ctx)

    def sharded_refusal(self) -> str | None:
        """The first option that cannot run on a sharded model (``lscape.sharding.check_sharded_options``):
        only the Hessian by finite differences on the whole model (or a ``params`` subset) is."""
        return sharded_refusal(self)

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs.update(self._matrix_attrs or {})
        return attrs

    def run_measure(self, ctx, state) -> dict[str, Any]:
        """Measure and record; a matrix read from the optimizer's state (``kind=preconditioned``)
        has none before the optimizer's first update, so that measurement (step 0) is skipped
        (also in ``lscape measure``, which loads each checkpoint's optimizer state and refuses,
        before the store exists, a source where no measured state holds one)."""
        try:
            return super().run_measure(ctx, state)
        except NotSteppedError:
            return {}

    def batches(self, ctx, state) -> list[Any]:
        return curvature_batches(self, ctx, state)

    def operator(self, ctx, batches: list[Any], params: Any = None, **overrides: Any) -> CurvatureOperator:
        """The curvature operator of the probe's options on ``batches`` (see :func:`make_operator`)."""
        return make_operator(self, ctx, batches, params=params, **overrides)

    def groups(self, ctx) -> list[tuple[str, list[str]]]:
        """The parameter groups of option ``groups`` (``[]`` without it)."""
        return groups_of(self, ctx)

    def group_names(self) -> list[str]:
        """The names of the parameter groups (stored as the attribute ``groups``)."""
        return [name for name, _ in (self._groups or [])]
