"""Tokenised pair sets, built once per (pairs file, tokenizer) and shared by every model trained on them (issue 24).

trl's ``DPOTrainer`` tokenises its dataset in its constructor (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``,
one chat-template pass per sequence), and the length filter (SPEC §6.2) tokenised every pair a second time: on the
study's pair sets (6,000+ pairs of ~4k-token agent trajectories) that was a minute or more per training, repeated by
each of the experiment's trainings on the same pairs. Here each pair is tokenised the way trl's ``tokenize_fn`` does
(``trl.data_utils._tokenize`` of the prompt with the generation prompt and of prompt + chosen / rejected; the
completion starts where they diverge), each distinct message list only once (a trajectory is in many pairs), and
the result is stored under ``<home>/cache/tokenized/<key>/`` with the full lengths the filter needs. The trainer
receives the already tokenised rows (``make_trainer_class`` skips trl's preparation for them).

* **Key** (sha256 of ``key_inputs``): the pairs file's sha256, the tokenizer's files' digest (and its pad/eos tokens),
  the trl / transformers / tokenizers versions and this module's ``FORMAT``. The length limits are not in the key:
  every pair is stored with its lengths and the limits are applied when the cache is read, so one entry serves
  every ``max_length``.
* **Writes** go to a temporary sibling renamed into place, under a lock (``<key>.lock``): a second training that
  needs the same entry waits for the first one's build, then reads it.
* **Verification**: ``cache.json`` (written last) records each data file's sha256 and the row count; an entry
  whose files do not match (truncated, half-copied, edited) is rebuilt with a warning, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import atomic_write_json, remove_dead_temps, temp_prefix
from pipeline.data.locks import file_lock
from pipeline.data.manifest import file_digest

log = logging.getLogger("pipeline.training")

#: bump when the stored columns or how they are computed change
FORMAT = 1
MANIFEST = "cache.json"
#: files that define how a tokenizer turns text (and chat templates) into ids
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                    "chat_template.jinja", "chat_template.json")
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "prompt_length", "chosen_length", "rejected_length")

#: how many entries this process built (tests: a reused entry is not tokenised again)
builds = 0


def tokenizer_digest(model_path: str) -> str:
    """sha256 over the tokenizer files of a local model folder (or of its Hugging Face cache snapshot)."""
    folder = Path(model_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_path, allow_patterns=list(_TOKENIZER_FILES), local_files_only=True))
    h = hashlib.sha256()
    found = 0
    for name in _TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            found += 1
            h.update(name.encode() + b"\0" + bytes.fromhex(file_digest(f)))
    if not found:
        from pipeline.errors import ConfigError

        raise ConfigError(f"--model {model_path}: no tokenizer files there ({', '.join(_TOKENIZER_FILES[:3])}, …)")
    return h.hexdigest()


def key_inputs(pairs_sha256: str, tokenizer: Any, tokenizer_sha256: str) -> dict[str, Any]:
    """Everything the stored token ids depend on."""
    import tokenizers
    import transformers
    import trl

    return {"format": FORMAT, "pairs_sha256": pairs_sha256, "tokenizer_sha256": tokenizer_sha256,
            "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token, "trl": trl.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def cache_root(home: Path | None = None) -> Path:
    from pipeline.settings import get_settings

    return (home or get_settings().home) / "cache" / "tokenized"


def tokenized_pairs(pairs: list[dict[str, Any]], pairs_sha256: str, tokenizer: Any, model_path: str, *,
                    home: Path | None = None) -> Any:
    """The pairs' token ids as a ``datasets.Dataset`` (one row per pair, in file order, columns ``COLUMNS``),
    from the cache when a verified entry exists, else built and stored."""
    inputs = key_inputs(pairs_sha256, tokenizer, tokenizer_digest(model_path))
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    root = cache_root(home)
    entry = root / key
    root.mkdir(parents=True, exist_ok=True)
    ds = _load_verified(entry, len(pairs))
    if ds is not None:
        log.info("tokenised pairs: cache hit %s", entry)
        return ds
    with file_lock(root / f"{key}.lock"):  # one builder; the others wait here, then read its entry
        ds = _load_verified(entry, len(pairs))
        if ds is not None:
            return ds
        _build(entry, pairs, tokenizer, inputs)
    ds = _load_verified(entry, len(pairs))
    if ds is None:  # just written and verified by _build: unreadable now means the disk is failing
        raise OSError(f"{entry}: the tokenised pairs just written cannot be read back")
    return ds


def _load_verified(entry: Path, n_pairs: int) -> Any:
    """The entry's dataset when every data file matches ``cache.json``; None when absent or damaged."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        if entry.exists():
            log.warning("%s: tokenised pairs without %s (an interrupted copy?): rebuilding", entry, MANIFEST)
        return None
    try:
        doc = json.loads(manifest.read_text())
        files = doc["files"]
        bad = [name for name, sha in files.items() if not (entry / name).is_file() or file_digest(entry / name) != sha]
        rows = int(doc["rows"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable %s (%s): rebuilding", entry, MANIFEST, e)
        return None
    if bad or rows != n_pairs:
        log.warning("%s: damaged tokenised pairs (%s): rebuilding", entry,
                    f"files differ from {MANIFEST}: {', '.join(bad)}" if bad else f"{rows} rows for {n_pairs} pairs")
        return None
    from datasets import disable_caching, load_from_disk

    # A dataset read from disk caches its .map results beside it, keyed by the map's fingerprint; trl computes the
    # reference log-probs in such a map, and a warm cache gave a run reference log-probs that were not its model's.
    # Maps over cached tokens are always computed afresh (in temporary files) in this process.
    disable_caching()
    return load_from_disk(str(entry / "data"))


def tokenize_pair(tokenizer: Any, pair: dict[str, Any], memo: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pair's ids exactly as trl's ``DPOTrainer`` tokenises a conversational example, with the full lengths
    the length filter compares (prompt with the generation prompt, prompt + chosen, prompt + rejected)."""
    from trl.data_utils import _tokenize, common_prefix_length

    import numpy as np

    memo = {} if memo is None else memo

    def ids(messages: list[dict[str, Any]], generation_prompt: bool) -> Any:
        key = hashlib.sha1(json.dumps([messages, generation_prompt], ensure_ascii=False).encode()).hexdigest()
        if key not in memo:  # int32 arrays: a few thousand ~4k-token sequences stay small in memory
            kwargs = {"add_generation_prompt": True} if generation_prompt else {}
            memo[key] = np.asarray(_tokenize(tokenizer, messages, tools=None, **kwargs)["input_ids"], dtype=np.int32)
        return memo[key]

    prompt = ids(pair["prompt"], True)
    chosen = ids(pair["prompt"] + pair["chosen"], False)
    rejected = ids(pair["prompt"] + pair["rejected"], False)
    cut = min(common_prefix_length(prompt.tolist(), chosen.tolist()),
              common_prefix_length(prompt.tolist(), rejected.tolist()))
    return {"prompt_ids": prompt[:cut], "chosen_ids": chosen[cut:], "rejected_ids": rejected[cut:],
            "prompt_length": len(prompt), "chosen_length": len(chosen), "rejected_length": len(rejected)}


def _table(pairs: list[dict[str, Any]], tokenizer: Any, memo: dict[str, Any]) -> Any:
    """The pairs' ids as an Arrow table (list columns built from offsets: no Python list per token)."""
    import numpy as np
    import pyarrow as pa

    cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for p in pairs:
        for c, v in tokenize_pair(tokenizer, p, memo).items():
            cols[c].append(v)
    arrays = {}
    for c in COLUMNS[:3]:
        offsets = np.zeros(len(pairs) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in cols[c]], out=offsets[1:])
        values = np.concatenate(cols[c]) if cols[c] else np.zeros(0, dtype=np.int32)
        arrays[c] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))
    for c in COLUMNS[3:]:
        arrays[c] = pa.array(np.asarray(cols[c], dtype=np.int32))
    return pa.table(arrays)


def _build(entry: Path, pairs: list[dict[str, Any]], tokenizer: Any, inputs: dict[str, Any]) -> None:
    from datasets import Dataset

    global builds
    t0 = time.perf_counter()
    memo: dict[str, Any] = {}
    table = _table(pairs, tokenizer, memo)
    remove_dead_temps(entry)
    tmp = entry.with_name(f"{temp_prefix(entry)}build")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        Dataset(table).save_to_disk(str(tmp / "data"))
        files = {str(f.relative_to(tmp)): file_digest(f) for f in sorted((tmp / "data").rglob("*")) if f.is_file()}
        atomic_write_json(tmp / MANIFEST, {**inputs, "rows": len(pairs), "files": files,
                                           "built_s": round(time.perf_counter() - t0, 2),
                                           "distinct_sequences": len(memo)})
        if entry.exists():  # a damaged entry (checked by the caller, under the lock): replaced whole
            old = entry.with_name(f"{temp_prefix(entry)}old")
            os.replace(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    builds += 1
    log.info("tokenised %d pairs (%d distinct sequences) in %.1f s -> %s", len(pairs), len(memo),
             time.perf_counter() - t0, entry)
