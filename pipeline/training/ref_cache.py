"""Reference log-probabilities, computed once per pair set and base model and reused by every model trained on them.

DPO compares the policy with the frozen reference model (the base: the adapter disabled). With
``precompute_ref_log_probs`` trl scores every training pair with it before the first step: a forward pass over the
whole pair set, about a third of an epoch's compute. The study trains several models on the same pairs and base
(two betas per pair set; the split seeds share pairs), and each recomputed the same numbers. Here they are stored
per pair and reused:

* **Key** (``key_inputs``): the base model's weights and config (sha256 of its folder, cached by path and inode
  times: ``pipeline.data.hashcache``), the quantization, dtype and device kind it ran with, the batch size (padding
  changes the arithmetic), and the torch / transformers / trl versions. A pair is found by the sha1 of its token
  ids (prompt, chosen, rejected), so one entry serves every pair set that holds the same pair.
* **Storage** ``<home>/cache/ref_logps/<key>.jsonl``: one durable line per pair (``JsonlAppender``: a line cut by
  a crash is dropped when the file is next opened), values as float32 round-trip exactly through JSON.
* Only pairs the run scores are computed: a run that computes them on the fly (short runs, ``ref_log_probs_plan``)
  neither reads nor writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import JsonlAppender, read_jsonl
from pipeline.data.locks import file_lock

log = logging.getLogger("pipeline.training")

#: bump when what is stored or how it is computed changes
FORMAT = 1
#: pairs whose reference log-probs this process computed (tests: a warm cache computes none)
computed = 0


def key_inputs(base_path: str, quantization: str, dtype: str, device: str, batch_size: int,
               shared_prompt: bool = False) -> dict[str, Any]:
    """Everything a pair's reference log-probs depend on besides the pair itself (``shared_prompt``: one pass per
    pair, which rounds differently)."""
    import torch
    import transformers
    import trl

    return {"format": FORMAT, "base_sha256": folder_digest(Path(base_path)), "quantization": quantization,
            "dtype": dtype, "device": device, "batch_size": batch_size, "shared_prompt": shared_prompt,
            "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}


def folder_digest(folder: Path) -> str:
    """sha256 over a model folder's files (names and contents), each file's digest cached by its inode stamp."""
    from pipeline.data.hashcache import file_digests

    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix != ".lock")
    digests = file_digests(files)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(folder)).encode() + b"\0" + digests[f].encode() + b"\0")
    return h.hexdigest()


def pair_key(row: dict[str, Any]) -> str:
    """sha1 of a tokenised pair's ids (``token_cache.COLUMNS``' id columns)."""
    h = hashlib.sha1()
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        h.update(col.encode() + b"\0" + json.dumps(list(map(int, row[col]))).encode() + b"\0")
    return h.hexdigest()


class RefLogpCache:
    """The stored reference log-probs of one key (see the module docstring)."""

    def __init__(self, root: Path, inputs: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
        self.path = root / f"{digest}.jsonl"
        self.inputs = inputs

    def lookup(self) -> dict[str, tuple[float, float]]:
        """Every stored pair's (chosen, rejected) reference log-probs."""
        if not self.path.is_file():
            return {}
        content = read_jsonl(self.path)
        return {r["pair"]: (float(r["chosen"]), float(r["rejected"])) for r in content.records}

    def add(self, values: dict[str, tuple[float, float]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = self.path.with_suffix(".key.json")
        with file_lock(self.path.with_suffix(".lock")):  # two trainings on the same pairs append in turn
            if not header.is_file():  # what the entry is, for a person looking at the cache
                header.write_text(json.dumps(self.inputs, indent=1, sort_keys=True))
            with JsonlAppender(self.path) as out:
                out.append(*({"pair": k, "chosen": c, "rejected": r} for k, (c, r) in values.items()))


def with_ref_logps(dataset: Any, cache: RefLogpCache, compute: Any) -> Any:
    """``dataset`` with the ``ref_chosen_logps`` / ``ref_rejected_logps`` columns trl's precompute adds: stored
    values where the cache has them, ``compute(subset)`` (trl's own precompute) for the rest, which are stored."""
    from datasets import Value

    global computed
    keys = [pair_key(row) for row in dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])]
    known = cache.lookup()
    missing = [i for i, k in enumerate(keys) if k not in known]
    if missing:
        part = compute(dataset.select(missing))
        new = {keys[i]: (float(c), float(r)) for i, c, r in zip(missing, part["ref_chosen_logps"],
                                                                    part["ref_rejected_logps"])}
        cache.add(new)
        known.update(new)
        computed += len(missing)
    log.info("reference log-probs: %d of %d pairs from the cache, %d computed (%s)", len(keys) - len(missing),
             len(keys), len(missing), cache.path)
    # float32, as trl's precompute stores them: the loss sees the same numbers either way
    dataset = dataset.add_column("ref_chosen_logps", [known[k][0] for k in keys], feature=Value("float32"))
    return dataset.add_column("ref_rejected_logps", [known[k][1] for k in keys], feature=Value("float32"))
