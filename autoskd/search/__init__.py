"""AutoSKD search: the categorical distribution over a teacher team and its bilevel optimisation,
and the trial machinery its arms run on (shared with ``autoskd tune`` in :mod:`autoskd.fanout`)."""
