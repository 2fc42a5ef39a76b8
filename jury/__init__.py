"""mose jury: experts cross-check an answer; the calibrator turns their evidence into P(correct).

Above ``experts`` (the pool that scores answers) and ``router_model`` (which picks the jurors);
``serve`` runs it behind ``POST /v1/crosscheck``. See ``jury/README.md``.
"""
