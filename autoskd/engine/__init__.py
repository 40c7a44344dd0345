"""The shared distillation engine: extraction/operation hooks, auxiliary model, one trainer."""
