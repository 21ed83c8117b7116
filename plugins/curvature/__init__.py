"""The curvature probes: ``sharpness`` (λ_max), ``hessian`` (top-k, trace, density),
``hessian-exact`` (dense spectrum) and ``eos`` (edge of stability), one module each, on the
shared :class:`lscape.plugins.curvature.base.CurvatureProbe`."""
