"""agentpipe core library: data contracts, LLM backends, emulation, evaluation, pairs, training, analysis.

This package never imports Airflow (see DESIGN.md §2).
"""

__version__ = "0.1.0"
