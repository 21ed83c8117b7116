"""The curvature probes: ``sharpness`` (λ_max), ``hessian`` (top-k, trace, density),
``hessian-exact`` (dense spectrum), ``eos`` (edge of stability) and ``critical-sharpness``
(curvature along the update, forwards only), one module each, on the
shared :class:`lscape.plugins.curvature.base.CurvatureProbe`."""
