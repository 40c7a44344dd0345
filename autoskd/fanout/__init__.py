"""Fan-out: search spaces, ``autoskd tune`` (Ray Tune trials sampled by Optuna, ASHA) and the
dashboard. It sits above :mod:`autoskd.search`, whose trial machinery (``TrialSpec``, worker
preparation, per-epoch reports and schedulers in :mod:`autoskd.search.early_stop`) it reuses:
one kind of tune trial is a whole AutoSKD search."""
