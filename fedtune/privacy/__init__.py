"""Differential privacy for fedtune (``privacy=dp_sgd``, ``privacy=client_dp``).

* :mod:`fedtune.privacy.options`: the config dataclasses of ``privacy=none|dp_sgd|client_dp``
  and :class:`~fedtune.privacy.options.PrivacySpec`, what each registers in
  :data:`fedtune.registry.PRIVACY` (the two mechanisms register from their own modules).

* :mod:`fedtune.privacy.accounting`: the per-client accountant history kept in Flower's
  ``Context.state``, ε from it, σ calibration to a target ε, config checks that need
  the data (``δ < 1/n``) or the method (its declared capabilities, e.g. zeroth-order
  methods are refused).
* :mod:`fedtune.privacy.dp_sgd`: the Opacus DP-SGD loop that replaces the shared
  first-order loop (:func:`clients.local_steps.run_local_steps`) and the wrapper
  around a trainer's ``train`` that enforces the budget and reports ε.
* :mod:`fedtune.privacy.client_level`: client-level DP, the method's strategy inside
  Flower's fixed-clipping DP wrappers (server- or client-side clipping), for the methods
  whose aggregate is a uniform mean of the upload.
"""
