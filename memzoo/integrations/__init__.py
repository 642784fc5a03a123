"""Adapters to other ecosystems (Hugging Face transformers, lm-eval); optional extras, imported lazily."""
