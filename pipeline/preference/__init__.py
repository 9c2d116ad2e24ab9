"""DPO preference pairs (SPEC §4): build them from evaluated trajectories, read them back for training.

Public API:

* :class:`PairConfig`, :func:`build_pair_set` (``pipeline.preference.pairs``), :func:`write_pair_set`
  (``pipeline.preference.output``)
* :func:`load_pairs`, :func:`split_by_cases` (``pipeline.data.pairs``: the pair file contract, read by training too)
* :func:`filter_by_length` (``pipeline.preference.lengths``)
* CLI: ``agentpipe pairs`` (``pipeline.preference.cli``)

Nothing heavy is imported here (no torch/transformers).
"""

from pipeline.data.pairs import load_pairs, split_by_cases
from pipeline.preference.lengths import filter_by_length
from pipeline.preference.output import write_pair_set
from pipeline.preference.pairs import METRICS, PairConfig, PairSetResult, build_pair_set, load_items

__all__ = ["METRICS", "PairConfig", "PairSetResult", "build_pair_set", "filter_by_length", "load_items",
           "load_pairs", "split_by_cases", "write_pair_set"]
