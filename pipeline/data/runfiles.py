"""Finding, loading and checking run files: trajectory JSONL files and their eval files (SPEC §2.2, §7.1)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.data.jsonl import JsonlContent, read_jsonl
from pipeline.data.naming import RunFileName, extract_seed, parse_run_filename
from pipeline.data.records import EvalRecord, TrajectoryRecord
from pipeline.data.split import TOOLEMU_CASES, test_cases
from pipeline.errors import DataError, PipelineError

RecordT = TypeVar("RecordT", bound=BaseModel)


@dataclass
class RunFile:
    """A trajectory file and the eval files that belong to it (same folder, same stem)."""

    path: Path
    name: RunFileName
    eval_files: dict[str, Path] = field(default_factory=dict)

    @property
    def model_dir(self) -> str:
        """The model folder name (the parent directory), used as the model name when grouping."""
        return self.path.parent.name


def find_run_files(root: str | Path) -> list[RunFile]:
    """All trajectory files below ``root`` (recursive, sorted) with their eval files.

    Raises ``DataError`` for a run-file name that does not parse, an eval file without its trajectory file,
    or overlapping case ranges within one configuration.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: run folder not found")
    trajectories: dict[Path, RunFile] = {}
    evals: list[tuple[Path, RunFileName]] = []
    for path in sorted(root.rglob("*.jsonl")):
        if path.name.startswith("."):
            continue  # temp files of atomic writes
        try:
            name = parse_run_filename(path.name)
        except PipelineError as e:
            raise DataError(f"{path}: {e}") from None
        if name.eval_type is not None:
            evals.append((path, name))
        elif name.is_trajectory_file:
            trajectories[path] = RunFile(path=path, name=name)
        else:
            raise DataError(f"{path}: unrecognised run-file suffix '{name.suffix}'")
    for path, name in evals:
        traj = path.with_name(name.trajectory().filename())
        if traj not in trajectories:
            raise DataError(f"{path}: eval file without its trajectory file {traj.name}")
        earlier = trajectories[traj].eval_files.get(name.eval_type)  # type: ignore[arg-type]
        if earlier is not None:
            raise DataError(f"{traj}: two {name.eval_type} eval files for one trajectory file: {earlier.name} and "
                            f"{path.name}; keep one")
        trajectories[traj].eval_files[name.eval_type] = path  # type: ignore[index]
    run_files = list(trajectories.values())
    check_no_overlap(run_files)
    return run_files


def check_no_overlap(run_files: list[RunFile]) -> None:
    """Ranged files of one (agent, emulator, evaluator, quantization) must not overlap ([start, end))."""
    by_config: dict[tuple, list[RunFile]] = defaultdict(list)
    for rf in run_files:
        if rf.name.case_range is not None:
            by_config[rf.name.config_key].append(rf)
    for group in by_config.values():
        group.sort(key=lambda r: r.name.case_range)  # type: ignore[arg-type, return-value]
        for a, b in zip(group, group[1:]):
            if b.name.case_range[0] < a.name.case_range[1]:  # type: ignore[index]
                raise DataError(f"{b.path}: case range r{b.name.case_range[0]}-{b.name.case_range[1]} overlaps "  # type: ignore[index]
                                f"{a.path.name}; expected non-overlapping ranges per configuration")


class StaleEvalError(DataError):
    """An eval file judged another version of its trajectory file (always fatal: its scores are not this file's)."""


def check_evals_current(run_files: list[RunFile]) -> None:
    """Refuse eval files whose manifest records a trajectory sha256 other than the trajectory file's now (the
    file was replaced or edited after it was judged). Eval files without a manifest (the study's released data)
    or whose manifest records no trajectory digest are taken as they are."""
    from pipeline.data.hashcache import file_digests
    from pipeline.data.manifest import read_manifest

    recorded: list[tuple[RunFile, Path, str]] = []
    for rf in run_files:
        for path in rf.eval_files.values():
            m = read_manifest(path) or {}
            sha = ((m.get("inputs") or {}).get("trajectories") or {}).get("sha256")
            if isinstance(sha, str):
                recorded.append((rf, path, sha))
    if not recorded:
        return
    current = file_digests(sorted({rf.path for rf, _, _ in recorded}))
    for rf, path, sha in recorded:
        if current[rf.path] != sha:
            raise StaleEvalError(f"{path}: judged another version of {rf.path} (trajectories sha256 {sha[:12]}… "
                                 f"recorded, the file is now {current[rf.path][:12]}…); expected the judgements of "
                                 f"this file: re-run `agentpipe evaluate --trajectories {rf.path}`")


def validate_records(content: JsonlContent, model: type[RecordT]) -> list[RecordT]:
    """Validate the records of a read JSONL file; a bad record raises ``DataError`` naming file and line."""
    out = []
    for i, raw in enumerate(content.records):
        try:
            out.append(model.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "record"
            raise DataError(f"{content.path}: line {i + 1}: field '{loc}': {err['msg']}") from None
    return out


def load_trajectories(path: str | Path, *, allow_truncated_tail: bool = False) -> list[TrajectoryRecord]:
    """Load and validate a trajectory file."""
    return validate_records(read_jsonl(path, allow_truncated_tail=allow_truncated_tail), TrajectoryRecord)


def load_evals(path: str | Path, *, allow_truncated_tail: bool = False) -> list[EvalRecord]:
    """Load and validate an eval file."""
    return validate_records(read_jsonl(path, allow_truncated_tail=allow_truncated_tail), EvalRecord)


def is_complete(rf: RunFile, trajectories: list[TrajectoryRecord], n_cases: int = TOOLEMU_CASES) -> bool:
    """A ranged file holds every case of its range, or (seed known) exactly the seed's test cases in it."""
    if rf.name.case_range is None:
        return len(trajectories) == n_cases
    start, end = rf.name.case_range
    if len(trajectories) == end - start:
        return True
    seed = extract_seed(str(rf.path.parent.name))
    if seed is None:
        return False
    expected = [i for i in test_cases(seed, n_cases) if start <= i < end]
    return sorted(t.case_idx for t in trajectories) == expected


def check_alignment(rf: RunFile, eval_type: str, trajectories: list[TrajectoryRecord],
                    evals: list[EvalRecord]) -> None:
    """An eval file lines up with its trajectory file (SPEC §7.1); raises ``DataError`` otherwise."""
    path = rf.eval_files[eval_type]
    if not trajectories:
        raise DataError(f"{rf.path}: trajectory file is empty")
    if len(evals) != len(trajectories):
        raise DataError(f"{path}: {len(evals)} evaluations for {len(trajectories)} trajectories; expected one per line")
    prev = -1
    for i, (t, e) in enumerate(zip(trajectories, evals)):
        if t.case_idx <= prev:
            raise DataError(f"{rf.path}: line {i + 1}: case_idx {t.case_idx} not increasing")
        prev = t.case_idx
        if rf.name.case_range and not rf.name.case_range[0] <= t.case_idx < rf.name.case_range[1]:
            raise DataError(f"{rf.path}: line {i + 1}: case_idx {t.case_idx} outside the file's range "
                            f"r{rf.name.case_range[0]}-{rf.name.case_range[1]}")
        if e.eval_id != i:
            raise DataError(f"{path}: line {i + 1}: field 'eval_id': expected {i} (the trajectory line index), "
                            f"got {e.eval_id}")
