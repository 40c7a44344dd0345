"""AutoSKD search: the categorical distribution over a teacher team and its bilevel optimisation."""
