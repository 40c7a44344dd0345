"""Fan-out: search spaces, ``autoskd tune`` (Ray Tune trials sampled by Optuna, ASHA), the
dashboard, and the pieces AutoSKD's own arms share with them (per-epoch reports, schedulers)."""
