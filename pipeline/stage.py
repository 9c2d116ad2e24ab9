"""What every stage shares: a typed configuration, its fingerprint, and a typed result.

A stage is a ``StageConfig`` subclass plus a function ``run(cfg) -> StageResult`` (like trl's config + trainer).
The command line, a ``--spec`` file and the Airflow operator all build the same config object
(``pipeline.cli_args``). The config declares which of its fields change the stage's results
(``fingerprint()``: every field except those in ``not_in_fingerprint``, plus the stage's versions); every output
records that fingerprint, and a rerun compares it:

* same fingerprint: resume or skip;
* different: ``FingerprintMismatch`` names each differing field with its old and new value (exit 2, nothing
  touched), unless ``force``, which first moves the old outputs aside as ``<name>.replaced-<UTC time>``.

Manifests record the fingerprint and its canonical hash (``config_digest``, ``pipeline.data.manifest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.jsonl import move_aside
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.stage")

#: Every stage config class by stage name (filled by ``StageConfig.__init_subclass__``): the generic fingerprint
#: test walks it, so a stage added later without a fingerprint is caught.
STAGES: dict[str, type[StageConfig]] = {}


class StageConfig(BaseModel):
    """Base of every stage's configuration. Field names are the option names (``--case-set`` = ``case_set``)."""

    model_config = ConfigDict(extra="forbid", frozen=False, arbitrary_types_allowed=True)

    #: the sub-command (``evaluate repair`` for nested ones)
    stage: ClassVar[str] = ""
    #: fields that do not change results (where to write logs, progress, waiting, batch sizes whose results are
    #: identical); everything else is part of the fingerprint
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("stage"):
            STAGES[cls.stage] = cls

    def versions(self) -> dict[str, Any]:
        """Versions of the prompts and algorithms that shape the results (a stage adds its own)."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change this stage's results, JSON-ready, plus ``versions``."""
        data = self.model_dump(mode="json", exclude=set(self.not_in_fingerprint))
        versions = self.versions()
        return data | ({"versions": versions} if versions else {})


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``field old → new`` for every field whose value differs (nested dicts by dotted names)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_short(a)} → {_short(b)}")
    return out


_UNSET = object()


def _short(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "…"


class FingerprintMismatch(ConfigError):
    """An output exists that a different configuration made."""


def check_fingerprint(output: Path, recorded: dict[str, Any] | None, current: dict[str, Any], stage: str) -> None:
    """Refuse (one line, exit 2) when ``output`` was made by another configuration; ``recorded`` is the
    fingerprint stored with it (``None``: the output has none, e.g. written by another tool)."""
    if recorded is None:
        raise FingerprintMismatch(f"{output}: exists but records no {stage} configuration (not written by this "
                                  f"version of agentpipe); rerun with --force to keep it aside and start over")
    diff = differences(recorded, current)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise FingerprintMismatch(f"{output}: made by a different {stage} configuration ({shown}); "
                                  f"rerun with the same options, or with --force to keep the old output aside")


def check_out_not_inputs(out: Path, inputs: list[Path | None], stage: str, option: str = "--out", *,
                         scanned: bool = False) -> None:
    """Refuse (one line) an output folder that is, or contains, one of the stage's ``inputs``: writing there, and
    with ``--force`` moving the old output aside, would touch the inputs themselves. ``scanned``: the inputs are
    folders searched recursively for run files, so an output inside one is refused too (the stage's own files
    would be read as inputs by its next run)."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        inside = scanned and src in target.parents
        if src == target or target in src.parents or inside:
            how = "is" if src == target else "is inside" if inside else "contains"
            raise ConfigError(f"{option} {out}: {how} the {stage} stage's input {given}; choose an output folder "
                              "apart from the inputs")


def check_own_output(path: Path, manifest: dict[str, Any] | None, stage: str, *, marker: str | None = None) -> None:
    """Refuse (one line) to move aside a folder that is not an output of ``stage``: one whose manifest names
    another stage, or without a manifest (nor the stage's own ``marker`` file). ``--force`` replaces only what
    the stage itself wrote; a folder of anything else (inputs, a user's files) is never moved."""
    if not path.is_dir():
        if marker:  # the stage writes folders (a model): a file there is somebody else's
            raise ConfigError(f"{path}: a file, not an output folder of {stage}; pass another --out")
        return  # a file at the exact name the stage writes is its output, whatever wrote it
    family = stage.split()[0]  # "analyze all" and "analyze aggregate" share their folders' manifests' stage names
    recorded = (manifest or {}).get("stage")
    if recorded is not None and str(recorded).split()[0] == family or marker and (path / marker).is_file():
        return
    what = f"its manifest names stage '{recorded}'" if recorded else "it has no manifest"
    raise ConfigError(f"{path}: not an output of {stage} ({what}); a stage writes into, and with --force moves "
                      f"aside, only its own output folders: pass another --out")


def prior_output(path: Path, fingerprint: dict[str, Any], stage: str, *, force: bool,
                 inputs: str | None = None, derived: bool = False, marker: str | None = None) -> bool:
    """What a stage finds at its output ``path`` (a file, or a folder with ``manifest.json`` inside):

    * True: this configuration's complete output, made from the same ``inputs`` (a digest): skip;
    * False: nothing (or an empty folder), or this configuration's output unfinished or from older inputs: redo;
    * another configuration's output (or one without a manifest): ``FingerprintMismatch``, or with ``force``
      it is moved aside first (then False). ``derived`` views (reports, analyses: cheap to rebuild, nothing of
      value in a failed attempt) also move another configuration's *unfinished* output aside without asking.

    ``marker``: for a stage whose output is a folder (a model), a file only this stage writes into it
    (``training_config.json``): with ``force`` a folder holding it but no manifest (written before manifests were
    recorded) is moved aside too, and a plain file at ``path`` is refused (``check_own_output``). A stage that
    writes into its folder over a long time claims it (``begin_output``) once its inputs have been checked.
    """
    from pipeline.data.jsonl import remove_dead_temps
    from pipeline.data.manifest import manifest_path, read_manifest

    remove_dead_temps(manifest_path(path))  # a killed writer's half-written manifest is nobody's output
    if not path.exists() or path.is_dir() and not any(path.iterdir()):
        return False
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    m = read_manifest(path)
    if m is None or m.get("config") != fingerprint:
        failed_attempt = derived and m is not None and m.get("status") != "complete"
        check_own_output(path, m, stage, marker=marker)  # a folder not this stage's is refused even with force
        if not force and not failed_attempt:
            check_fingerprint(path, m.get("config") if m else None, fingerprint, stage)
        for moved in move_aside(path, *([] if path.is_dir() else [manifest_path(path)])):
            log.info("kept aside: %s", moved)
        return False
    return m.get("status") == "complete" and (inputs is None or m.get("inputs_digest") == inputs)


def journal_paths(final: Path) -> tuple[Path, Path]:
    """The ``.part`` journal of an output written line by line, and its fingerprint (``.part.json``)."""
    return final.with_name(final.name + ".part"), final.with_name(final.name + ".part.json")


def journaled_output(final: Path, fingerprint: dict[str, Any], stage: str, *, force: bool) -> bool:
    """What a stage that journals its lines (emulate, evaluate) finds at ``final``: True when it is complete for
    this fingerprint (skip). A journal or final file of another configuration (or one that records none) is
    refused, or with ``force`` moved aside; this configuration's unfinished work is left to resume."""
    from pipeline.data.manifest import manifest_path, read_manifest

    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    part, meta = journal_paths(final)
    manifest = read_manifest(final)
    stale: list[Path] = []
    recorded = json.loads(meta.read_text()) if meta.exists() else None
    if part.exists() and recorded != fingerprint or meta.exists() and recorded != fingerprint:
        if not force:
            check_fingerprint(part, recorded, fingerprint, stage)
        stale += [part, meta]
    # a final file without a manifest beside this configuration's journal is what a crash between writing the
    # file (assembled from that journal) and its manifest leaves: this configuration's unfinished work, rewritten
    # from the journal; a final file with no record at all is another tool's and refused
    ours_unfinished = manifest is None and recorded == fingerprint
    if final.exists() and not ours_unfinished and (manifest is None or manifest.get("config") != fingerprint):
        if not force:
            check_fingerprint(final, manifest.get("config") if manifest else None, fingerprint, stage)
        stale += [final, manifest_path(final)]
    for moved in move_aside(*stale):
        log.warning("kept aside: %s", moved)
    complete = (final.exists() and manifest is not None and manifest.get("config") == fingerprint
                and manifest.get("status") == "complete")
    if complete and recorded == fingerprint:  # a crash after the manifest, before the journal was removed
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    return complete


def begin_output(folder: Path, stage: str, fingerprint: dict[str, Any]) -> None:
    """Claim an output folder for this configuration before writing into it (manifest status ``incomplete``;
    the stage writes ``complete`` last), so that what a failed attempt leaves is never taken for another's."""
    from pipeline.data.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, stage=stage, config=fingerprint, status="incomplete")


def content_digest(roots: list[Path], suffixes: tuple[str, ...] = (".jsonl",)) -> str:
    """A digest of the content of the files below ``roots`` (relative path and sha256 of each): what derived
    views (reports, analyses) compare to know whether their inputs changed since they were made. Any edit is
    seen, also one that keeps size and modification time; unchanged files are not re-read
    (``pipeline.data.hashcache``)."""
    from pipeline.data.hashcache import file_digests

    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file()) if root.is_dir() else [root]
        digests = file_digests(files)
        for f in files:
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{digests[f]}\n".encode())
    return h.hexdigest()[:16]


#: The exit code of a stage that is waiting for a service (EX_TEMPFAIL: try again later).
WAITING_EXIT = 75


class StageResult(BaseModel):
    """What a stage made: ``--result`` writes it as JSON (the Airflow operator's XCom value)."""

    model_config = ConfigDict(extra="allow")

    stage: str
    #: complete: every item done; incomplete: failed requests or errors left (a rerun retries exactly those);
    #: skipped: the same configuration had already completed; waiting: work handed to a service that answers
    #: later (a Batch API batch): the same command collects it
    status: Literal["complete", "incomplete", "skipped", "waiting"] = "complete"
    outputs: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, Any] = Field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "incomplete" else WAITING_EXIT if self.status == "waiting" else 0

    def to_json(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())
