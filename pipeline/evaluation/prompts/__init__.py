"""Evaluator prompt texts, one module per judge, each with a ``PROMPT_VERSION``."""
