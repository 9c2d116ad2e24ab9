"""The command line against bad and hostile input (issue 23).

* ``test_bad_path_input``: ONE table-driven test feeding every sub-command's file and folder inputs (found by
  walking ``pipeline.cli.build_parser()``) a missing path, an empty file, a folder for a file, a file for a folder,
  non-JSON, truncated JSON and non-UTF-8 bytes: exactly one line ``agentpipe: error: …`` on stderr, exit 2, no
  traceback, nothing written. ``test_every_path_option_is_in_the_table`` makes a new path option join the table.
* Names that become paths stay inside their output folder; ``--force`` moves only the stage's own outputs; option
  bounds; ``--result`` a folder; a closed stdout pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from tests.conftest import run_agentpipe
from tests.test_pairs import write_run


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path_factory) -> None:
    """Every command's default folders (AGENTPIPE_HOME) in a temporary folder; no tracking server."""
    monkeypatch.setenv("AGENTPIPE_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ------------------------------------------------------------------------------------------------- bad paths
FILE_KINDS = ("missing", "empty", "folder", "non_json", "truncated_json", "non_utf8")
FOLDER_KINDS = ("missing", "file")
EITHER_KINDS = ("missing", "empty", "non_json", "truncated_json", "non_utf8")  # a folder or one run file

#: Options that take a file or folder, by (command, option): the arguments the command needs besides it
#: ({BAD} is the bad path, {RUNS} a valid run folder, {PAIRS} a valid pair set,
#: {OUT} an output folder that must stay absent), the kinds of bad path, and the bad file's name.
TABLE: dict[tuple[str, str], tuple[list[str], tuple[str, ...], str]] = {
    ("", "--result"): (["--result", "{BAD}", "split", "--seed", "0"], ("folder",), "result.json"),
    ("data fetch", "--from"): (["data", "fetch", "--from", "{BAD}", "--data-dir", "{OUT}"],
                               ("missing", "empty", "non_json", "non_utf8"), "source.json"),
    ("data fetch", "--data-dir"): (["data", "fetch", "--data-dir", "{BAD}", "--only", "toolemu", "--from",
                                    "{EMPTY}"], ("file",), "data"),
    ("data check", "--data-dir"): (["data", "check", "--data-dir", "{BAD}"], FOLDER_KINDS, "data"),
    ("data check", "--runs"): (["data", "check", "--cases", "demo", "--runs", "{BAD}"], FOLDER_KINDS, "runs"),
    ("data check", "--cases"): (["data", "check", "--cases", "{BAD}", "--no-runs"], FILE_KINDS, "cases.json"),
    ("replay", "--runs"): (["replay", "--runs", "{BAD}", "--out", "{OUT}/replay.json"], EITHER_KINDS,
                           "m_emu-e_eval-j_r0-1.jsonl"),
    ("emulate", "--case-set"): (["emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator",
                                 "--case-set", "{BAD}", "--out", "{OUT}"], FILE_KINDS, "cases.json"),
    ("evaluate", "--trajectories"): (["evaluate", "--trajectories", "{BAD}", "--evaluator", "scripted:judge"],
                                     FILE_KINDS, "m_emu-e_eval-j_r0-1.jsonl"),
    ("evaluate repair", "--data-dir"): (["evaluate", "repair", "--data-dir", "{BAD}"], EITHER_KINDS,
                                        "m_emu-e_eval-j_r0-1_eval_agent_safe.jsonl"),
    ("evaluate rerun-failed", "--data-dir"): (["evaluate", "rerun-failed", "--data-dir", "{BAD}", "--evaluator",
                                              "scripted:judge"], EITHER_KINDS,
                                             "m_emu-e_eval-j_r0-1_eval_agent_safe.jsonl"),
    ("report", "--runs"): (["report", "--runs", "{BAD}", "--out", "{OUT}", "--no-track"], FOLDER_KINDS, "runs"),
    ("report", "--human-labels"): (["report", "--runs", "{RUNS}", "--human-labels", "{BAD}", "--out", "{OUT}",
                                    "--no-track"], ("missing", "folder", "non_json", "truncated_json", "non_utf8"),
                                   "labels.jsonl"),  # empty: no labels yet (valid)
    ("pairs", "--data-dir"): (["pairs", "--data-dir", "{BAD}", "--metric", "safe", "--cases", "demo", "--out",
                               "{OUT}"], FOLDER_KINDS, "runs"),
    ("pairs", "--cases"): (["pairs", "--data-dir", "{RUNS}", "--metric", "safe", "--cases", "{BAD}", "--out",
                            "{OUT}"], FILE_KINDS, "cases.json"),
    ("train", "--pairs"): (["train", "--model", "tiny", "--pairs", "{BAD}", "--seed", "0", "--out", "{OUT}"],
                           FILE_KINDS, "safe_toy.jsonl"),
    ("train", "--val-pairs"): (["train", "--model", "tiny", "--pairs", "{PAIRS}", "--val-pairs", "{BAD}", "--seed",
                                "0", "--out", "{OUT}"], FILE_KINDS, "safe_toy_s0_test.jsonl"),
    ("merge", "--adapter"): (["merge", "--adapter", "{BAD}", "--out", "{OUT}"], FOLDER_KINDS, "adapter"),
    ("merge", "--adapter/adapter_config.json"): (["merge", "--adapter", "{BADPARENT}", "--out", "{OUT}"],
                                                 FILE_KINDS[1:], "adapter_config.json"),
    ("analyze aggregate", "--runs"): (["analyze", "aggregate", "--runs", "{BAD}", "--out", "{OUT}"], FOLDER_KINDS,
                                      "runs"),
    ("analyze table", "--runs"): (["analyze", "table", "--runs", "{BAD}"], FOLDER_KINDS, "runs"),
    ("analyze agreement", "--a"): (["analyze", "agreement", "--a", "{BAD}", "--b", "{RUNS}"], FOLDER_KINDS, "a"),
    ("analyze agreement", "--b"): (["analyze", "agreement", "--a", "{RUNS}", "--b", "{BAD}"], FOLDER_KINDS, "b"),
    ("analyze all", "--runs"): (["analyze", "all", "--runs", "{BAD}", "--out", "{OUT}", "--no-track"],
                                FOLDER_KINDS, "runs"),
}
#: Every stage's --spec (one reader, but each command reads it at its own moment): the stage's arguments
SPEC_COMMANDS = {"emulate": ["emulate"], "evaluate": ["evaluate"], "evaluate repair": ["evaluate", "repair"],
                 "evaluate rerun-failed": ["evaluate", "rerun-failed"], "report": ["report"], "pairs": ["pairs"],
                 "train": ["train"], "merge": ["merge"], "analyze aggregate": ["analyze", "aggregate"],
                 "analyze all": ["analyze", "all"]}
for _cmd, _words in SPEC_COMMANDS.items():
    TABLE[(_cmd, "--spec")] = ([*_words, "--spec", "{BAD}"], FILE_KINDS, "spec.json")
    TABLE[(_cmd, "--spec yaml")] = ([*_words, "--spec", "{BAD}"], ("non_utf8", "truncated_json"), "spec.yaml")

#: Path-like options that are outputs, model specs or a case range, not inputs read as files
NOT_INPUTS = {("analyze agreement", "--out"), ("track feedback", "--out"), ("pairs", "--out"), ("pairs", "--tokenizer"),
              ("replay", "--out"), ("emulate", "--out"), ("report", "--out"), ("train", "--out"), ("merge", "--out"),
              ("analyze aggregate", "--out"), ("analyze all", "--out"), ("evaluate", "--cache"),
              ("emulate", "--cache"), ("emulate", "--cases")}
#: Words in an option's name or metavar that say it names a file or folder
PATHY = ("FILE", "DIR", "ARCHIVE", "PATH")
PATHY_NAMES = {"--runs", "--data-dir", "--trajectories", "--pairs", "--val-pairs", "--adapter", "--cases",
               "--case-set", "--human-labels", "--a", "--b", "--from", "--spec", "--result", "--out", "--cache",
               "--tokenizer"}


def _path_options() -> set[tuple[str, str]]:
    """(command, option) of every option that names a file or folder, walking the real parser."""
    found = set()

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*words, name])
            elif action.option_strings:
                option = action.option_strings[0]
                if (action.type is Path or any(w in str(action.metavar or "") for w in PATHY)
                        or option in PATHY_NAMES):
                    found.add((" ".join(words), option))

    walk(build_parser(), [])
    return found


def test_every_path_option_is_in_the_table():
    covered = {(cmd, opt.split()[0].split("/")[0]) for cmd, opt in TABLE} | NOT_INPUTS
    assert _path_options() - covered == set()


def _write_bad(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return
    if kind == "folder":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a folder\n")
    else:
        content = {"empty": b"", "non_json": b"this is not JSON {\n", "truncated_json": b'{"input": "half',
                   "non_utf8": b'{"input": "\xff\xfe\xc3("}\n'}[kind]
        path.write_bytes(content)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Valid inputs besides the bad one: a run folder of two evaluated models, a pair set, an empty folder."""
    from pipeline.data.cases import load_named_case_set
    from pipeline.preference import PairConfig, build_pair_set, write_pair_set

    root = tmp_path_factory.mktemp("valid")
    runs = root / "runs"
    for model, s in (("m_a", 3), ("m_b", 0)):
        write_run(runs, model, [2], {"safe": [s], "help_ignore_safety": [s]})
    result = build_pair_set([runs], PairConfig(metric="safe"), evaluator="toy",
                            case_set=load_named_case_set("demo"))
    pairs = write_pair_set(result, root / "pairs")
    (root / "empty").mkdir()
    return {"RUNS": runs, "PAIRS": pairs, "EMPTY": root / "empty"}


CASES = [pytest.param(key, kind, id=f"{key[0] or 'agentpipe'} {key[1]} {kind}".replace(" ", "_"))
         for key, (_, kinds, _) in TABLE.items() for kind in kinds]


@pytest.mark.parametrize(("key", "kind"), CASES)
def test_bad_path_input(key, kind, inputs, tmp_path):
    argv, _, name = TABLE[key]
    work = tmp_path / "work"
    bad = work / "bad" / name
    _write_bad(bad, kind)
    values = {k: str(v) for k, v in inputs.items()} | {"BAD": str(bad), "OUT": str(work / "out"),
                                                        "BADPARENT": str(bad.parent)}
    args = [a.format(**values) for a in argv]
    env = {"AGENTPIPE_HOME": str(work / "home"), "MLFLOW_TRACKING_URI": ""}
    before = _snapshot(tmp_path), _snapshot(inputs["RUNS"].parent)
    r = run_agentpipe(*args, cwd=tmp_path, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("agentpipe: error: "), r.stderr[-2000:]
    assert bad.name in lines[0] or key[1].split()[0] in lines[0], f"the error does not name the bad input: {lines}"
    assert (_snapshot(tmp_path), _snapshot(inputs["RUNS"].parent)) == before, "the command wrote something"


# ------------------------------------------------------------------------------------------ names and --force
def _one_error_line(r: subprocess.CompletedProcess, fragment: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("agentpipe: error: ") and fragment in lines[0], r.stderr


def test_names_cannot_climb_out_of_the_output_folder(inputs, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    r = run_agentpipe("pairs", "--data-dir", str(inputs["RUNS"]), "--metric", "safe", "--cases", "demo",
                      "--evaluator", "x/../../../escape", "--out", str(out))
    _one_error_line(r, "--evaluator")
    r = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--case-set", "demo",
                      "--cases", "0-1", "--agent-label", "..", "--out", str(out))
    _one_error_line(r, "--agent-label")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == []


def test_force_moves_only_the_stages_own_outputs(inputs, tmp_path):
    runs = tmp_path / "home" / "runs"
    write_run(runs, "m_a", [2], {"safe": [3], "help_ignore_safety": [3]})
    user = tmp_path / "home" / "notes"
    user.mkdir()
    (user / "mine.txt").write_text("a user's file\n")
    before = _snapshot(tmp_path)
    for out in (runs, runs.parent):  # the inputs' folder, a folder above it
        r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(out), "--no-track", "--force")
        _one_error_line(r, f"--out {out}: {'is' if out == runs else 'contains'} the analyze all stage's input")
        r = run_agentpipe("report", "--runs", str(runs), "--out", str(out), "--no-track", "--force")
        _one_error_line(r, "the report stage's input")
    # a folder of other things is never the stage's output, with or without --force
    for force in ([], ["--force"]):
        r = run_agentpipe("report", "--runs", str(runs), "--out", str(user), "--no-track", *force)
        _one_error_line(r, f"{user}: not an output of report (it has no manifest)")
    assert _snapshot(tmp_path) == before


def test_force_still_replaces_the_stages_own_output(inputs, tmp_path):
    out = tmp_path / "reports"
    args = ["report", "--runs", str(inputs["RUNS"]), "--no-track"]
    assert run_agentpipe(*args, "--out", str(out)).returncode == 0
    m = json.loads((out / "manifest.json").read_text())
    m["config"]["changed"] = True  # as if another configuration had made it
    (out / "manifest.json").write_text(json.dumps(m))
    _one_error_line(run_agentpipe(*args, "--out", str(out)), "made by a different report configuration")
    r = run_agentpipe(*args, "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("reports.replaced-*"))) == 1 and (out / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(("args", "fragment"), [
    (["emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--max-steps", "-5"],
     "--max-steps: must be >= 1 (or -1"),
    (["emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--max-steps", "0"],
     "--max-steps: must be >= 1 (or -1"),
    (["emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--agent-seed", "-1"],
     "--agent-seed: Input should be greater than or equal to 0"),
    (["evaluate", "--trajectories", "x.jsonl", "--evaluator", "scripted:judge", "--seed", "-3"],
     "--seed: Input should be greater than or equal to 0"),
    (["train", "--model", "tiny", "--pairs", "p.jsonl", "--seed", "0", "--max-steps", "0"],
     "--max-steps: must be >= 1 (or -1"),
    (["train", "--model", "tiny", "--pairs", "p.jsonl", "--seed", "0", "--max-grad-norm", "-1"],
     "--max-grad-norm: Input should be greater than or equal to 0"),
], ids=["emulate-max-steps-neg", "emulate-max-steps-0", "emulate-agent-seed", "evaluate-seed", "train-max-steps",
        "train-max-grad-norm"])
def test_option_bounds(args, fragment, tmp_path):
    _one_error_line(run_agentpipe(*args, "--out", str(tmp_path / "out")) if args[0] != "evaluate"
                    else run_agentpipe(*args, cwd=tmp_path), fragment)
    assert list(tmp_path.iterdir()) == []


def test_builtin_numbers_are_bounded():
    for args, fragment in [(["split", "--seed", "-1"], "argument --seed: must be >= 0"),
                           (["data", "fetch", "--workers", "0"], "argument --workers: must be >= 1"),
                           (["llm", "chat", "hi", "--model", "scripted:echo", "--max-new-tokens", "0"],
                            "argument --max-new-tokens: must be >= 1")]:
        r = run_agentpipe(*args)
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_emulate_max_steps_in_range_is_accepted(tmp_path):
    r = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--case-set",
                      "demo", "--cases", "0-1", "--max-steps", "1", "--out", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    [path] = (tmp_path / "out").rglob("*_r0-1.jsonl")
    assert len(json.loads(path.read_text().splitlines()[0])["intermediate_steps"]) <= 2


def test_result_folder_is_refused_before_the_stage_runs(inputs, tmp_path):
    folder = tmp_path / "result"
    folder.mkdir()
    out = tmp_path / "pairs"
    r = run_agentpipe("--result", str(folder), "pairs", "--data-dir", str(inputs["RUNS"]), "--metric", "safe",
                      "--cases", "demo", "--out", str(out))
    _one_error_line(r, f"--result {folder}: is a folder")
    assert not out.exists() and list(folder.iterdir()) == []


@pytest.mark.parametrize("args", [["data", "check", "--cases", "demo", "--runs", "{RUNS}"],
                                  ["analyze", "agreement", "--a", "{RUNS}", "--b", "{RUNS}"],
                                  ["split", "--seed", "0"]], ids=["data-check", "analyze-agreement", "split"])
def test_a_closed_stdout_pipe_ends_quietly(args, inputs):
    """``agentpipe … | head -1``: the reader is gone before the command writes (its end of the pipe closed)."""
    exe = Path(sys.executable).with_name("agentpipe")
    argv = [str(exe), *(a.format(RUNS=inputs["RUNS"]) for a in args)]
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # nobody will read: every write to stdout fails with EPIPE
    try:
        p = subprocess.run(argv, stdout=write_fd, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_fd)
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
    assert p.returncode == 1, p.stderr


# ------------------------------------------------------------------------------------------------ pairs
def test_pairs_consistency_accepts_every_value_its_help_lists(tmp_path):
    import re

    runs = tmp_path / "runs"
    write_run(runs, "m_a", [2], {"safe": [[3, 3, 3]]})  # all agree
    write_run(runs, "m_b", [2], {"safe": [[0, 0, 1]]})  # majority / all-but-one / within 1
    write_run(runs, "m_c", [2], {"safe": [[0, 1, 3]]})  # no agreement
    write_run(runs, "m_d", [2], {"safe": [[1, 0, 0, 1]]})  # within 1 only
    listed = re.search(r"--consistency \{([^}]*)\}", run_agentpipe("pairs", "--help").stdout)
    assert listed is not None
    expected = {"none": 3, "exact_match": 0, "majority_agree": 1, "all_but_one_agree": 1, "within_1": 2}
    assert listed.group(1).split(",") == list(expected)
    for value, n in expected.items():
        r = run_agentpipe("pairs", "--data-dir", str(runs), "--metric", "safe", "--cases", "demo", "--evaluator",
                          "toy", "--consistency", value, "--out", str(tmp_path / "out"))
        assert r.returncode == 0 and f" {n} pairs over" in r.stdout, (value, r.stdout, r.stderr)


def test_a_second_identical_pairs_run_is_refused_or_waits(inputs, tmp_path):
    from pipeline.data.locks import writer_lock

    out = tmp_path / "out"
    args = ["pairs", "--data-dir", str(inputs["RUNS"]), "--metric", "safe", "--cases", "demo", "--evaluator", "toy",
            "--out", str(out)]
    path = out / "safe_toy.jsonl"
    with writer_lock(path, what="pair set"):  # the first run, still building
        _one_error_line(run_agentpipe(*args), f"{path}: another process is writing this pair set")
        assert not path.exists()
        exe = Path(sys.executable).with_name("agentpipe")
        waiting = subprocess.Popen([str(exe), *args, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            waiting.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass  # blocked on the lock, as it should be
        assert waiting.returncode is None and not path.exists()
    stdout, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and "1 pairs over 1 cases" in stdout, stderr
    assert path.is_file()


def test_a_refused_pairs_build_leaves_the_other_builds_lock_alone(tmp_path, monkeypatch):
    """The race the refusal must survive: this build finds no lock file, another build creates and takes it just
    before this one tries, this one is refused. Cleaning up then must not delete the other build's lock file (a
    third build would take a fresh one while the other still writes)."""
    import contextlib

    import pipeline.data.locks as locks
    from pipeline.errors import ConfigError
    from pipeline.preference.stage import _builder_lock

    path = tmp_path / "out" / "safe_toy.jsonl"

    @contextlib.contextmanager
    def taken_meanwhile(output, **_):
        locks.lock_path(Path(output)).parent.mkdir(parents=True, exist_ok=True)
        locks.lock_path(Path(output)).write_text("")  # the other build's lock file, created after our check
        raise ConfigError(f"{output}: another process is writing this pair set")
        yield

    monkeypatch.setattr(locks, "writer_lock", taken_meanwhile)
    with pytest.raises(ConfigError), _builder_lock(path, wait=False):
        pass
    assert locks.lock_path(path).is_file()


def test_pairs_out_inside_its_data_dir_is_refused(inputs, tmp_path):
    """Pair sets written inside the run folder they are built from would be read as run files by the next
    build (and change its input digest): refused in one line."""
    runs = tmp_path / "runs"
    shutil.copytree(inputs["RUNS"], runs)
    before = sorted(p.name for p in runs.rglob("*"))
    _one_error_line(run_agentpipe("pairs", "--data-dir", str(runs), "--metric", "safe", "--cases", "demo",
                                  "--evaluator", "toy", "--out", str(runs / "pairs")),
                    f"--out {runs / 'pairs'}: is inside the pairs stage's input")
    assert sorted(p.name for p in runs.rglob("*")) == before
