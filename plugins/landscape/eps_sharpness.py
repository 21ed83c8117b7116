"""The `eps-sharpness` probe: Keskar et al. (2017) ε-sharpness, the largest loss rise in a box around θ."""

from __future__ import annotations

from lscape import Option, Output, Probe, hookimpl
from lscape.data import derived_seed
from lscape.errors import UsageError
from lscape.params import select_parameters

from ._keskar import eps_sharpness_repeated, model_objective

__all__ = ['EpsSharpness']

class EpsSharpness(Probe):
    """Keskar et al. (2017) ε-sharpness φ = [max_{y∈C_ε} L(θ + Ay) − L(θ)] / (1 + L(θ)) × 100 over
    the box |y_i| ≤ ε(|(A⁺θ)_i| + 1), in full space (A = I) or a random p-dimensional
    subspace, maximised by L-BFGS-B or projected gradient ascent, repeated with mean ± std."""

    name = "eps-sharpness"
    help = "Keskar ε-sharpness: largest loss rise in a box around θ (full space or random subspace)"
    schedule = "epoch"
    data = "subset"
    at = "step_end"
    options = (
        Option("eps", float, 5e-4, "box size ε", minimum=0.0),
        Option("subspace", int, 0, "dimension p of a random subspace (0: full space)", minimum=0),
        Option("subspace_matrix", str, "smoothout",
               "random subspace: smoothout (A⁺ U(−1,1), unit rows, A = pinv(A⁺), as the seed) or gaussian (A N(0,1))",
               choices=("smoothout", "gaussian")),
        Option("split", str, "train", "measure on training batches, or on the eval set as the SmoothOut code does",
               choices=("train", "eval")),
        Option("method", str, "pga", "maximiser: projected gradient ascent, or scipy's L-BFGS-B",
               choices=("pga", "lbfgsb")),
        Option("iters", int, 10, "iterations of the maximiser", minimum=1),
        Option("repeats", int, 5, "independent maximisations (random starts and subspaces)", minimum=1),
        Option("init", str, "random", "start of each maximisation", choices=("random", "zero")),
        Option("mode", str, "eval", "module mode while evaluating", choices=("eval", "train")),
        Option("params", str, None, "parameter subset: comma-separated glob patterns on names"),
        Option("seed", int, None, "seed of starts and subspaces (default: derived from the run seed)"),
    )
    outputs = (
        Output("eps_sharpness", units="%", long_name="ε-sharpness, mean over repeats"),
        Output("eps_sharpness_std", units="%", long_name="ε-sharpness, standard deviation over repeats"),
        Output("values", dims=("repeat",), units="%", long_name="ε-sharpness of each repeat"),
        Output("loss", long_name="loss at θ on the measurement data"),
    )

    def check(self, ctx):
        if self.opts.split == "eval" and getattr(ctx, "eval_set", None) is None:
            raise UsageError("eps-sharpness.split=eval needs an eval set (the data gives none)")
        if self.opts.method == "lbfgsb":
            try:
                import scipy.optimize  # noqa: F401
            except ImportError:
                raise UsageError("eps-sharpness.method=lbfgsb needs scipy: pip install scipy, "
                                 "or use method=pga") from None

    def measure(self, ctx, state):
        params = [p for _, p in select_parameters(ctx.model, self.opts.params)]
        ctx.model.train(self.opts.mode == "train")
        fun, x0, restore = model_objective(ctx.model, ctx.adapter, self._measure_batches(ctx, state), params)
        seed = self.opts.seed if self.opts.seed is not None else derived_seed(ctx.config.seed, "eps-sharpness")
        try:
            res = eps_sharpness_repeated(
                fun, x0, repeats=self.opts.repeats, seed=int(seed) + int(state.step), eps=self.opts.eps,
                subspace=self.opts.subspace or None, method=self.opts.method, iters=self.opts.iters, init=self.opts.init,
                subspace_matrix=self.opts.subspace_matrix,
            )
            f0 = fun(x0)[0]
        finally:
            restore()
        return {"eps_sharpness": res["mean"], "eps_sharpness_std": res["std"], "values": res["values"], "loss": f0}

    def _measure_batches(self, ctx, state) -> list:
        """The probe's ``data`` batches of the training set, or with ``split=eval`` of the eval set
        (``data=full``: all of it; otherwise ``batches`` fixed batches; seeded, drawn once)."""
        if self.opts.split == "train":
            return self.batches(ctx, state)
        if ctx.eval_set is None:
            raise UsageError("eps-sharpness.split=eval needs an eval set (the data gives none)")
        if self.opts.data == "full":
            return self.measurement_full(ctx, ctx.eval_set)
        return self.measurement_subset(ctx, ctx.eval_set, purpose=f"{self.name}-eval")



@hookimpl
def register_probes(register):
    register(EpsSharpness)


@hookimpl
def register_plots(register):
    from ._plots import plot_eps_sharpness

    register("eps-sharpness", plot_eps_sharpness)
