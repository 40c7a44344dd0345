"""Generative decoder language models: corpora, token rows and causal-LM models for distillation."""
