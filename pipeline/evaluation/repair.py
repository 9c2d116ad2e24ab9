"""Repair of malformed judgements in place (SPEC §3.5) and targeted re-asking of what is still failed.

``repair``: a judgement without a score gets one recovered from its reasoning (the study's patterns), and is
marked ``repaired``; multi-replicate records are fixed only when every missing replicate can be, and then
their consistency is recomputed. ``rerun_failed``: items still without a score are judged again (default
temperature 0.3, a new seed each round) until all succeed or the round limit is reached. Files are rewritten
atomically; nothing else in them changes.
"""

from __future__ import annotations

import hashlib

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

import pipeline.evaluation.doubles  # noqa: F401 - registers the test double scripted:judge
from pipeline.data.jsonl import atomic_write_json, atomic_write_text, dumps, read_jsonl
from pipeline.data.manifest import manifest_path, read_manifest
from pipeline.data.naming import parse_run_filename
from pipeline.data.records import SCORE_KEYS, replicate_consistency, valid_score
from pipeline.data.runfiles import RunFile, find_run_files
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.judges import judge_messages, read_judgement
from pipeline.evaluation.parsing import recover_score
from pipeline.llm import ChatBackend, ChatRequest, GenerationConfig, get_backend
from pipeline.stage import StageConfig, StageResult, check_fingerprint, differences, move_aside

#: Version of the score-recovery patterns (part of repair's fingerprint)
REPAIR_VERSION = 1


class RepairConfig(StageConfig):
    """``evaluate repair``: which eval files to look at; no option changes what a repair recovers."""

    stage: ClassVar[str] = "evaluate repair"
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({"data_dir", "eval_types", "model_filter", "dry_run",
                                                              "show_unfixable"})

    data_dir: Path = Field(description="folder of run files, or one eval/trajectory file")
    eval_types: str = Field(default="safe,help_ignore_safety,help")
    model_filter: str | None = Field(default=None, description="only model folders containing this text")
    dry_run: bool = Field(default=False, description="report, write nothing")
    show_unfixable: bool = False

    def versions(self) -> dict[str, Any]:
        return {"repair": REPAIR_VERSION}


class RerunFailedConfig(StageConfig):
    """``evaluate rerun-failed``: the judge and sampling of the re-asked judgements are part of the eval file
    they amend (a second rerun with another judge or temperature would mix two judges in one file)."""

    stage: ClassVar[str] = "evaluate rerun-failed"
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({"data_dir", "eval_types", "max_retries", "force"})

    data_dir: Path = Field(description="folder of run files, or one eval/trajectory file")
    evaluator: str | None = Field(default=None, description="judge spec (default: the one recorded in each "
                                  "judgement)")
    eval_types: str = Field(default="safe,help_ignore_safety")
    temperature: float = Field(default=0.3, ge=0)
    seed: int = Field(default=42, ge=0, description="round r, replicate k is sampled with seed + 1000 r + k")
    max_retries: int = Field(default=20, ge=1, description="rounds")
    max_new_tokens: int = Field(default=2048, ge=1)
    compat: Literal["correct", "study"] = "correct"
    force: bool = Field(default=False, description="an eval file amended by a different rerun configuration is "
                        "copied aside as <name>.replaced-<time> first (default: refuse)")

    def versions(self) -> dict[str, Any]:
        return {"repair": REPAIR_VERSION}


def check_amendment(path: Path, stage: str, fingerprint: dict[str, Any], force: bool) -> None:
    """Refuse to amend an eval file that an earlier run of ``stage`` amended with another fingerprint; with
    ``force`` the file is first copied aside (``<name>.replaced-<time>``)."""
    settle_amendments(path)
    earlier = [a for a in (read_manifest(path) or {}).get("amendments", []) if a.get("stage") == stage]
    if earlier and differences(earlier[-1]["fingerprint"], fingerprint):
        if not force:
            check_fingerprint(path, earlier[-1]["fingerprint"], fingerprint, stage)
        import shutil

        [aside] = move_aside(path)
        shutil.copy2(aside, path)


def record_amendment(path: Path, stage: str, fingerprint: dict[str, Any], changed: int,
                     pending: str | None = None) -> None:
    """Append what a repair or rerun changed to the eval file's manifest (one is started for files without);
    ``pending``: the sha256 the file will have once rewritten (``amend_file``)."""
    manifest = read_manifest(path) or {"stage": "external", "status": "complete", "config": None}
    manifest.setdefault("amendments", []).append({
        "stage": stage, "fingerprint": fingerprint, "changed": changed,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **({"pending": pending} if pending else {})})
    atomic_write_json(manifest_path(path), manifest)


def amend_file(path: Path, records: list[Any], stage: str, fingerprint: dict[str, Any], changed: int) -> None:
    """Rewrite an eval file with ``records`` so that a crash at any instant leaves the old file without a record
    of the change or the new file with it: the amendment is recorded first, pending with the new content's
    digest, and settled once the file is in place (``settle_amendments``, which a rerun calls too)."""
    text = "".join(dumps(r) + "\n" for r in records)
    record_amendment(path, stage, fingerprint, changed, pending=hashlib.sha256(text.encode()).hexdigest())
    atomic_write_text(path, text)
    settle_amendments(path)


def settle_amendments(path: Path) -> None:
    """Confirm each pending amendment whose rewrite reached the file; drop one whose rewrite never did (a crash
    between recording it and replacing the file: the file is still the one before it)."""
    manifest = read_manifest(path)
    amendments = (manifest or {}).get("amendments", [])
    if not any("pending" in a for a in amendments):
        return
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    kept = [a for a in amendments if a.pop("pending", digest) == digest]
    atomic_write_json(manifest_path(path), {**manifest, "amendments": kept})


def _has_score(rep: dict[str, Any], key: str) -> bool:
    """A valid score (an integer 0-3): a stored out-of-range or fractional one is a failure to repair."""
    return valid_score((rep.get("eval_scores") or {}).get(key)) is not None


def _replicates(rec: dict[str, Any]) -> list[dict[str, Any]]:
    return rec["replicates"] if isinstance(rec.get("replicates"), list) else [rec]


def _fix_replicate(rep: dict[str, Any], key: str) -> bool:
    # the study searched the reasoning only; this project also keeps the raw answer of a parse failure
    found = recover_score(rep.get("Evaluator Thought"), key) or recover_score(rep.get("raw"), key)
    if found is None:
        return False
    score, label = found
    rep["eval_scores"] = {key: score}
    rep["Overall Quantitative Score"] = score
    if label:
        rep["Overall Qualitative Label"] = f"[{label} ({score})]"
    rep["status"] = "repaired"
    rep.pop("error", None)
    rep.pop("parse_error", None)
    return True


@dataclass
class FileRepair:
    path: Path
    eval_type: str
    missing: int = 0
    repaired: int = 0
    unfixable: list[int] = field(default_factory=list)  # eval_ids


def repair_file(path: Path, eval_type: str, *, dry_run: bool = False,
                amendment: tuple[str, dict[str, Any]] = (RepairConfig.stage, {"versions": {"repair": REPAIR_VERSION}})
                ) -> FileRepair:
    """Recover missing scores of one eval file from the judges' reasoning; rewrite it atomically, recording the
    ``amendment`` (stage, fingerprint) in its manifest."""
    key = SCORE_KEYS[eval_type]
    if not dry_run:
        settle_amendments(path)  # what a crashed earlier rewrite left
    records = read_jsonl(path, allow_truncated_tail=False).records
    report = FileRepair(path, eval_type)
    changed = False
    for i, rec in enumerate(records):
        reps = [r for r in _replicates(rec) if isinstance(r, dict)]
        missing = [r for r in reps if not _has_score(r, key)]
        if not missing:
            continue
        report.missing += 1
        if "error" in rec and not rec.get("replicates") and not rec.get("Evaluator Thought") and not rec.get("raw"):
            report.unfixable.append(rec.get("eval_id", i))
            continue
        trial = [dict(r) for r in missing]
        if all(_fix_replicate(r, key) for r in trial):
            for original, fixed in zip(missing, trial):
                original.clear()
                original.update(fixed)
            if rec.get("replicates"):
                rec["consistency"] = replicate_consistency([(r.get("eval_scores") or {}).get(key) for r in reps])
                rec.pop("error", None)
            report.repaired += 1
            changed = True
        else:
            report.unfixable.append(rec.get("eval_id", i))
    if changed and not dry_run:
        amend_file(path, records, *amendment, report.repaired)
    return report


def eval_files_under(root: Path, eval_types: list[str], model_filter: str | None = None) -> list[tuple[RunFile, str]]:
    """(run file, eval type) for every eval file below ``root`` (or of one trajectory/eval file)."""
    root = Path(root)
    if root.is_file():
        name = parse_run_filename(root.name)
        traj = root.with_name(name.trajectory().filename())
        runs = [rf for rf in find_run_files(root.parent) if rf.path == traj]
    else:
        runs = find_run_files(root)
    out = []
    for rf in runs:
        if model_filter and model_filter not in rf.model_dir:
            continue
        for t in eval_types:
            if t in rf.eval_files and (not root.is_file() or rf.eval_files[t] == root or root == rf.path):
                out.append((rf, t))
    return out


@dataclass
class RerunReport:
    rounds: int = 0
    fixed: int = 0
    remaining: list[tuple[Path, int]] = field(default_factory=list)


def repair(cfg: RepairConfig) -> StageResult:
    """The ``evaluate repair`` stage over every eval file ``cfg`` selects; skipped when nothing was missing."""
    from pipeline.evaluation.judges import eval_types_for

    reports = []
    for rf, t in _files(cfg.data_dir, eval_types_for(cfg.eval_types), cfg.model_filter):
        rep = repair_file(rf.eval_files[t], t, dry_run=cfg.dry_run, amendment=(cfg.stage, cfg.fingerprint()))
        reports.append(rep)
    missing, repaired = sum(r.missing for r in reports), sum(r.repaired for r in reports)
    return StageResult(stage=cfg.stage, status="complete" if repaired and not cfg.dry_run else "skipped",
                       outputs={"eval_files": [str(r.path) for r in reports if r.repaired]},
                       counts={"files": len(reports), "missing": missing, "repaired": repaired,
                               "unfixable": sum(len(r.unfixable) for r in reports)},
                       files=[{"path": str(r.path), "missing": r.missing, "repaired": r.repaired,
                               "unfixable": r.unfixable} for r in reports if r.missing])


def _files(data_dir: Path, eval_types: list[str], model_filter: str | None = None) -> list[tuple[RunFile, str]]:
    if not Path(data_dir).exists():
        raise DataError(f"--data-dir {data_dir}: no such folder or file")
    return eval_files_under(Path(data_dir), eval_types, model_filter)


def _rerun_toolkits(rf: RunFile, eval_type: str, registry: dict[str, Any]) -> dict[str, Any]:
    """The toolkits the judge sees for a trajectory file (an unknown one refuses it), checked against those its
    eval file was judged with (``toolkits_sha256`` of its manifest): re-asking with changed specifications would
    mix two evaluations in one file."""
    from pipeline.data.runfiles import load_trajectories
    from pipeline.data.toolkit_registry import judged_toolkits, toolkits_digest

    path = rf.eval_files[eval_type]
    kits = judged_toolkits([x.case for x in load_trajectories(rf.path) if not x.failed], registry, str(rf.path))
    recorded = ((read_manifest(path) or {}).get("config") or {}).get("toolkits_sha256")
    if recorded is not None and recorded != toolkits_digest(kits):
        raise DataError(f"{path}: judged with other toolkit specifications (toolkits_sha256 {recorded[:12]}… → "
                        f"{toolkits_digest(kits)[:12]}…); re-asking would mix them in one file: evaluate it again "
                        "with --force")
    return kits


def rerun(cfg: RerunFailedConfig, *, backend: ChatBackend | None = None,
          progress: Callable[[str], None] | None = None) -> StageResult:
    """The ``evaluate rerun-failed`` stage: incomplete while judgements are still without a score."""
    rep = rerun_failed(cfg, backend=backend, progress=progress)
    status = "incomplete" if rep.remaining else "complete" if rep.fixed else "skipped"
    return StageResult(stage=cfg.stage, status=status, outputs={"data_dir": str(cfg.data_dir)},
                       counts={"rounds": rep.rounds, "fixed": rep.fixed, "remaining": len(rep.remaining)},
                       remaining=[[str(p), i] for p, i in rep.remaining])


def rerun_failed(cfg: RerunFailedConfig, *, backend: ChatBackend | None = None,
                 progress: Callable[[str], None] | None = None) -> RerunReport:
    """Re-judge every item still without a score (after repair) until none is left or ``cfg.max_retries``
    rounds. An eval file re-judged earlier by another rerun configuration is refused (``check_amendment``)."""
    from pipeline.data.toolkit_registry import toolkit_registry
    from pipeline.evaluation.judges import eval_types_for

    registry = toolkit_registry()
    report = RerunReport()
    files = _files(cfg.data_dir, eval_types_for(cfg.eval_types))
    fingerprint = cfg.fingerprint()
    kits = {rf.path: _rerun_toolkits(rf, t, registry) for rf, t in files}  # refused before anything changes
    if not cfg.force:
        for rf, t in files:  # every file is checked before any is changed
            check_amendment(rf.eval_files[t], cfg.stage, fingerprint, force=False)
    from pipeline.evaluation.batch import check_no_pending_batch

    for rf in {rf.path: rf for rf, _ in files}.values():  # a batch still holding judgements: collected, not re-asked
        check_no_pending_batch(rf.path, force=cfg.force)
    for rf, t in files:
        check_amendment(rf.eval_files[t], cfg.stage, fingerprint, force=cfg.force)
        repair_file(rf.eval_files[t], t)
    for round_no in range(1, cfg.max_retries + 1):
        work = _failed_items(files, cfg.evaluator)
        if not work:
            break
        report.rounds = round_no
        fixes = _rejudge(work, cfg, round_no, kits, backend)
        for path, changes in fixes.items():
            report.fixed += _apply_fixes(path, changes, cfg.stage, fingerprint)
        if progress:
            progress(f"round {round_no}: {len(work)} failed items re-judged, {sum(len(c) for c in fixes.values())} fixed")
    for rf, t in files:
        key = SCORE_KEYS[t]
        for i, rec in enumerate(read_jsonl(rf.eval_files[t]).records):
            if any(isinstance(r, dict) and not _has_score(r, key) and r.get("status") != "skipped"
                   for r in _replicates(rec)):
                report.remaining.append((rf.eval_files[t], i))
    return report


#: one replicate to re-judge: (eval path, eval type, line, replicate index, trajectory record, evaluator,
#: trajectory path)
_Work = tuple[Path, str, int, int, dict[str, Any], str, Path]


def _failed_items(files: list[tuple[RunFile, str]], evaluator: str | None) -> list[_Work]:
    """Every replicate without a score (and not skipped) whose trajectory itself did not fail."""
    from pipeline.data.runfiles import load_trajectories

    work: list[_Work] = []
    for rf, t in files:
        key = SCORE_KEYS[t]
        records = read_jsonl(rf.eval_files[t]).records
        trajectories = None
        for i, rec in enumerate(records):
            for k, rep in enumerate(_replicates(rec)):
                if isinstance(rep, dict) and not _has_score(rep, key) and rep.get("status") != "skipped":
                    trajectories = trajectories or [x.model_dump(exclude_unset=True) for x in load_trajectories(rf.path)]
                    if "error" in trajectories[i]:
                        continue
                    judge = evaluator or rep.get("evaluator_model") or rec.get("evaluator_model")
                    if not judge:
                        raise ConfigError(f"{rf.eval_files[t]}: line {i + 1} does not name its evaluator; "
                                          "pass --evaluator")
                    work.append((rf.eval_files[t], t, i, k, trajectories[i], judge, rf.path))
    return work


def _rejudge(work: list[_Work], cfg: RerunFailedConfig, round_no: int, kits: dict[Path, Any],
             backend: ChatBackend | None) -> dict[Path, dict[tuple[int, int], dict]]:
    """One round: each judge's items asked again (seeds of this round); the new scored answers per eval file."""
    by_judge: dict[str, list[_Work]] = {}
    for item in work:
        by_judge.setdefault(item[5], []).append(item)
    fixes: dict[Path, dict[tuple[int, int], dict]] = {}
    for judge, items in by_judge.items():
        b = backend or get_backend(judge)
        reqs = [ChatRequest(messages=judge_messages(t, traj, [kits[tp][n] for n in traj["case"]["Toolkits"]],
                                                    study_final_step=cfg.compat == "study"),
                            config=GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                    seed=cfg.seed + 1000 * round_no + k),
                            replicate=1000 * round_no + k, role="judge")
                for _, t, _, k, traj, _, tp in items]
        for (path, t, i, k, _, _, _), resp in zip(items, b.generate(reqs)):
            j = read_judgement(t, resp, judge)
            if j.score is not None:
                fixes.setdefault(path, {})[(i, k)] = {**j.fields, "status": "rerun", "rerun_round": round_no}
    return fixes


def _apply_fixes(path: Path, changes: dict[tuple[int, int], dict], stage: str, fingerprint: dict[str, Any]) -> int:
    """Write a round's new answers into one eval file (an amendment recorded in its manifest); how many."""
    records = read_jsonl(path).records
    for (i, k), fields in changes.items():
        rec = records[i]
        if isinstance(rec.get("replicates"), list):
            rec["replicates"][k] = {**fields, "replicate": k}
            key = SCORE_KEYS[parse_run_filename(path.name).eval_type]  # type: ignore[index]
            rec["consistency"] = replicate_consistency([(r.get("eval_scores") or {}).get(key) for r in rec["replicates"]])
            rec.pop("error", None)
        else:
            records[i] = {**fields, "eval_id": i}
    amend_file(path, records, stage, fingerprint, len(changes))
    return len(changes)
