"""Prompt texts, one module per role. Each module has a ``PROMPT_VERSION`` that goes into every record."""
