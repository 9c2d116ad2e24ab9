"""Slurm logic that needs neither Airflow nor a cluster: cluster settings, sbatch command and batch-script building,
the job environment, ``scontrol``/``sacct`` output parsing, job states and their outcome, log tails.

The hook (:mod:`plugins.slurm.hook`) and the trigger (:mod:`plugins.slurm.trigger`) run the commands built here;
everything below is a plain function so that it is unit-testable on any machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from plugins.slurm.resources import GPU_CLASSES

#: Job states after which a job never runs again (``scontrol``/``sacct`` names, long form).
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "PREEMPTED",
                             "NODE_FAIL", "BOOT_FAIL", "DEADLINE"})
#: The one terminal state that is a success.
SUCCESS_STATE = "COMPLETED"
#: Pseudo-states reported by the trigger (never by Slurm): the job could not be found any more, or the trigger gave
#: up waiting (its ``timeout``); both fail the task.
UNKNOWN_STATE = "UNKNOWN"
WAIT_TIMEOUT_STATE = "WAIT_TIMEOUT"
#: ``squeue``'s short codes, for completeness (``sacct``/``scontrol`` print long names).
_SHORT = {"CD": "COMPLETED", "F": "FAILED", "CA": "CANCELLED", "TO": "TIMEOUT", "OOM": "OUT_OF_MEMORY",
          "PR": "PREEMPTED", "NF": "NODE_FAIL", "BF": "BOOT_FAIL", "DL": "DEADLINE", "PD": "PENDING",
          "R": "RUNNING", "CG": "COMPLETING", "S": "SUSPENDED", "RQ": "REQUEUED", "RS": "RESIZING"}

#: Environment variables a stage job gets (names or ``PREFIX*``); values come from the submitting process's
#: environment and are handed to ``sbatch`` through ITS environment with ``--export=NAMES`` (names only), so a
#: secret is never written into the batch script, the sbatch command line or a log.
JOB_ENV_NAMES: tuple[str, ...] = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONUNBUFFERED",
    "AGENTPIPE_*", "MLFLOW_*", "AIRFLOW_CTX_*",
    "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENROUTER_API_KEY",
    "HF_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
)
_JOB_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class SlurmSettings:
    """Cluster settings: the extras of the Airflow connection ``slurm_default`` (all optional).

    Defaults suit the local single-node test cluster (``scripts/slurm_up.sh``): no partition/account/qos flags
    (the cluster's defaults apply), the ``agentpipe`` of the running Python, logs under
    ``$AGENTPIPE_HOME/logs/slurm``.
    """

    partition: str | None = None            # every job (unless gpu_partition/cpu_partition say otherwise)
    gpu_partition: str | None = None        # jobs with gpus > 0
    cpu_partition: str | None = None        # jobs without GPUs
    account: str | None = None
    qos: str | None = None
    default_time: str | None = None         # time limit for stages the resource rule has no entry for
    default_mem: str | None = None
    #: Slurm ``--constraint`` per abstract GPU class of the resource rule, e.g. {"big": "a100_80gb"}. A class
    #: without an entry gets no constraint (a warning is logged); any other value is passed through as is.
    gpu_constraints: dict[str, str] = field(default_factory=dict)
    gres: str = "gpu:{gpus}"                # --gres template, e.g. "gpu:a100:{gpus}"
    extra_sbatch_args: tuple[str, ...] = ()  # appended to every sbatch call, e.g. ["--exclude=node13"]
    venv: str | None = None                 # virtualenv on the cluster: its bin/ goes first on PATH
    agentpipe: str | None = None            # the agentpipe executable on the cluster (default: <venv>/bin/agentpipe)
    log_dir: str | None = None              # job logs (default $AGENTPIPE_HOME/logs/slurm); must be shared
    workdir: str | None = None              # --chdir (default $AGENTPIPE_HOME)
    setup: tuple[str, ...] = ()             # shell lines run before the stage, e.g. ["module load cuda/12.4"]
    env: dict[str, str] = field(default_factory=dict)  # extra NON-secret variables for every job
    export_env: tuple[str, ...] = ()        # more variable names to pass through (secrets allowed: names only)
    bin_dir: str | None = None              # folder of sbatch/scontrol/sacct/scancel (default: PATH)
    poll_interval: float = 10.0             # trigger: seconds between state polls
    initial_delay: float = 10.0             # trigger: seconds before the first poll (Airflow 3 deferral race)
    job_timeout: float | None = None        # trigger: give up (and scancel) after this many seconds
    #: seconds before the time limit (or a pre-emption) at which Slurm sends SIGTERM to the stage
    #: (``--signal=B:TERM@<s>``): training saves a checkpoint and every stage's journal is already durable.
    #: 0: no early signal (Slurm's own KillWait, often 30 s, is all the stage gets).
    signal_grace: int = 300
    requeue: bool = False                   # --requeue: the cluster may requeue a pre-empted job (if it allows)

    @classmethod
    def from_extras(cls, extras: Mapping[str, Any] | None) -> SlurmSettings:
        """Build from a connection's extras dict; unknown keys raise (typos must not pass silently)."""
        extras = dict(extras or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extras) - known)
        if unknown:
            raise ValueError(f"slurm connection extras: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        for key in ("extra_sbatch_args", "setup", "export_env"):
            if key in extras:
                value = extras[key]
                extras[key] = tuple(shlex.split(value) if key == "extra_sbatch_args" else [value]) \
                    if isinstance(value, str) else tuple(value or ())
        for key in ("poll_interval", "initial_delay", "job_timeout"):
            if extras.get(key) is not None:
                extras[key] = float(extras[key])
        if extras.get("signal_grace") is not None:
            extras["signal_grace"] = int(extras["signal_grace"])
        for key in ("gpu_constraints", "env"):
            if extras.get(key) is not None and not isinstance(extras[key], Mapping):
                raise ValueError(f"slurm connection extras: '{key}' must be an object")
            extras[key] = {str(k): str(v) for k, v in (extras.get(key) or {}).items()}
        return cls(**extras)

    def command(self, name: str) -> str:
        """Path of a Slurm client command (``sbatch``, ``scontrol``, …)."""
        return str(Path(self.bin_dir) / name) if self.bin_dir else name

    def agentpipe_executable(self) -> str:
        """The ``agentpipe`` the job runs: explicit, else in ``venv``, else beside this Python, else on PATH."""
        if self.agentpipe:
            return self.agentpipe
        if self.venv:
            return str(Path(self.venv) / "bin" / "agentpipe")
        here = Path(sys.executable).with_name("agentpipe")
        return str(here) if here.exists() else "agentpipe"


# --------------------------------------------------------------------------------------------------- names
def sanitize_job_name(*parts: object, max_len: int = 200) -> str:
    """``dag.task.run`` as a Slurm job / file name: runs of other characters than ``[A-Za-z0-9._-]`` → ``_``."""
    text = ".".join(str(p) for p in parts if p is not None and str(p) != "")
    text = _JOB_NAME_BAD.sub("_", text).strip("._") or "agentpipe"
    return text[:max_len]


def expand_log_path(pattern: str, job_id: str, job_name: str | None = None) -> str:
    """The job's output file from an ``--output`` pattern (``%j`` job id, ``%x`` job name, ``%%``)."""
    out = pattern.replace("%%", "\0").replace("%j", job_id).replace("%A", job_id)
    if job_name is not None:
        out = out.replace("%x", job_name)
    return out.replace("\0", "%")


# ------------------------------------------------------------------------------------------------ environment
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def job_environment(base: Mapping[str, str], extra: Mapping[str, str] | None = None, *,
                    pass_through: Iterable[str] = (), venv: str | None = None) -> dict[str, str]:
    """The variables a job gets: the allow-listed ones from ``base`` (see ``JOB_ENV_NAMES``) plus ``pass_through``
    names, then ``extra`` (which wins); ``venv``'s bin/ is put first on PATH. Nothing else leaks into the job."""
    patterns = (*JOB_ENV_NAMES, *pass_through)
    env = {k: v for k, v in base.items() if _matches(k, patterns)}
    env.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    env.setdefault("PATH", os.defpath)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if venv:
        env["PATH"] = f"{Path(venv) / 'bin'}{os.pathsep}{env['PATH']}"
    return env


#: Variables that configure the Slurm client commands themselves (kept in sbatch's environment, not exported).
CLIENT_ENV = ("SLURM_CONF", "SLURM_CLUSTERS", "SBATCH_*")


def sbatch_environment(job_env: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """The environment ``sbatch`` itself runs with: the job's variables plus the client settings (SLURM_CONF …).
    ``--export=<names>`` makes Slurm take the job's values from here."""
    return {**{k: v for k, v in base.items() if _matches(k, CLIENT_ENV)}, **job_env}


# ------------------------------------------------------------------------------------------------- commands
def render_batch_script(argv: Sequence[str], *, setup: Sequence[str] = (), workdir: str | None = None) -> str:
    """A batch script that runs ``argv`` (exec, so the job's exit code is the stage's). It holds the command line
    and the setup lines only: no environment values, hence no secrets."""
    lines = ["#!/bin/bash",
             "# agentpipe stage job, generated by plugins/slurm. Environment (secrets included) comes from sbatch",
             "# --export=<names>; nothing secret is written here.",
             "set -o pipefail"]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)}")
    lines += list(setup)
    lines.append('echo "[agentpipe] slurm job ${SLURM_JOB_ID:-?} on $(hostname) started $(date -Is 2>/dev/null)"')
    lines.append("exec " + shlex.join(str(a) for a in argv))
    return "\n".join(lines) + "\n"


def time_limit_seconds(text: str | None) -> int | None:
    """A Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in seconds."""
    if not text:
        return None
    days, _, clock = str(text).rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, sec = parts
    elif len(parts) == 2:
        h, (m, sec) = 0, parts
    else:
        h, m, sec = 0, parts[0], 0
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


#: Job ends a retry cures as it is: the stage resumes its own output on another node or later.
RETRY_AS_IS = frozenset({"PREEMPTED", "NODE_FAIL", "BOOT_FAIL"})
#: Job ends a retry may cure with more of one resource: retried once with twice as much.
RETRY_WITH_MORE = {"TIMEOUT": "time", "OUT_OF_MEMORY": "mem"}


def retry_decision(state: str, exit_code: str, bumped: Iterable[str] = ()) -> tuple[bool, str | None]:
    """(retry?, the resource to double first) for a failed job. Exit code 2 (bad configuration or input) is
    never retried; TIMEOUT / OUT_OF_MEMORY are retried once with twice the time / memory, then fail; every other
    end (PREEMPTED, NODE_FAIL, a stage's own failure …) is left to the task's retries."""
    if parse_exit_code(exit_code)[0] == 2 and state == "FAILED":
        return False, None
    if state in RETRY_WITH_MORE:
        resource = RETRY_WITH_MORE[state]
        return (False, None) if resource in set(bumped) else (True, resource)
    return True, None


def doubled(resource: str, value: str) -> str:
    """Twice a Slurm time limit (``D-HH:MM:SS``) or memory (``8G`` → ``16G``)."""
    if resource == "time":
        total = 2 * (time_limit_seconds(value) or 0)
        days, rest = divmod(total, 86400)
        return (f"{days}-" if days else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    number, unit = float(value.rstrip("KMGTkmgt")), value.lstrip("0123456789.")
    return f"{int(number * 2) if (number * 2).is_integer() else number * 2}{unit}"


def signal_grace(grace: int, time_limit: str | None) -> int:
    """The ``--signal`` lead time for a job: ``grace``, but at most a tenth of a short time limit (a 5-minute test
    job must not be told to stop at once); 0 when there is nothing sensible to send."""
    limit = time_limit_seconds(time_limit)
    if grace <= 0:
        return 0
    if limit is not None and grace > limit // 10:
        grace = limit // 10
    return grace if grace >= 10 else 0


def sbatch_command(settings: SlurmSettings, resources: Mapping[str, Any], *, job_name: str, output: str,
                   export: Iterable[str], script: str | None = None, wrap: str | None = None,
                   workdir: str | None = None) -> list[str]:
    """The ``sbatch --parsable`` argv for one job; exactly one of ``script`` (a file) and ``wrap`` (a command)."""
    if (script is None) == (wrap is None):
        raise ValueError("sbatch_command: pass exactly one of script= and wrap=")
    gpus = int(resources.get("gpus") or 0)
    # append: a requeued (pre-empted) job's log keeps the earlier run's lines, and the trigger's offset stays valid
    argv = [settings.command("sbatch"), "--parsable", f"--job-name={job_name}", f"--output={output}",
            "--open-mode=append", "--nodes=1", "--ntasks=1", f"--cpus-per-task={int(resources.get('cpus') or 1)}"]
    if resources.get("mem"):
        argv.append(f"--mem={resources['mem']}")
    if resources.get("time"):
        argv.append(f"--time={resources['time']}")
    partition = resources.get("partition") or \
        (settings.gpu_partition if gpus else settings.cpu_partition) or settings.partition
    if partition:
        argv.append(f"--partition={partition}")
    if settings.account:
        argv.append(f"--account={settings.account}")
    if settings.qos:
        argv.append(f"--qos={settings.qos}")
    if gpus:
        argv.append(f"--gres={settings.gres.format(gpus=gpus)}")
    constraint = slurm_constraint(settings, resources)
    if constraint:
        argv.append(f"--constraint={constraint}")
    if workdir:
        argv.append(f"--chdir={workdir}")
    grace = signal_grace(settings.signal_grace, resources.get("time"))
    if grace:  # B: the batch shell, which execs the stage
        argv.append(f"--signal=B:TERM@{grace}")
    if settings.requeue:
        argv.append("--requeue")
    names = sorted(set(export))
    argv.append("--export=" + (",".join(names) if names else "NONE"))
    argv += list(settings.extra_sbatch_args)
    argv += [str(a) for a in resources.get("extra_args") or ()]
    argv += [script] if script is not None else ["--wrap", wrap]  # type: ignore[list-item]
    return argv


def slurm_constraint(settings: SlurmSettings, resources: Mapping[str, Any]) -> str | None:
    """``--constraint`` for a job: an explicit ``constraint``, else the cluster's mapping of ``gpu_constraint``
    (an abstract class such as ``big``); an unmapped class gives none."""
    if resources.get("constraint"):
        return str(resources["constraint"])
    cls = resources.get("gpu_constraint")
    if not cls:
        return None
    if cls in settings.gpu_constraints:
        return settings.gpu_constraints[cls] or None
    return None if cls in GPU_CLASSES else str(cls)


def parse_sbatch_output(text: str) -> str:
    """The job id from ``sbatch --parsable`` output (``123`` or ``123;cluster``)."""
    for line in reversed(text.strip().splitlines()):
        job = line.strip().split(";")[0]
        if job.isdigit() or re.fullmatch(r"\d+(_\d+)?", job):
            return job
    raise ValueError(f"sbatch printed no job id: {text.strip()[:300]!r}")


# -------------------------------------------------------------------------------------------------- states
@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about a job. ``state`` is a long state name, or UNKNOWN when no source knows the job."""

    job_id: str
    state: str
    exit_code: str = ""       # "rc:signal" as Slurm prints it
    reason: str = ""
    source: str = ""          # scontrol | sacct -c | sacct

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def return_code(self) -> int | None:
        return parse_exit_code(self.exit_code)[0]

    @property
    def signal(self) -> int | None:
        return parse_exit_code(self.exit_code)[1]


def normalise_state(state: str) -> str:
    """``CANCELLED by 0`` → ``CANCELLED``; ``CANCELLED+`` → ``CANCELLED``; short codes → long names."""
    word = (state or "").strip().split(" ")[0].rstrip("+").upper()
    return _SHORT.get(word, word) or UNKNOWN_STATE


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """``"3:0"`` → (3, 0); anything else → (None, None)."""
    m = re.fullmatch(r"\s*(\d+)(?::(\d+))?\s*", text or "")
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (None, None)


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o ID`` → its ``Key=Value`` fields (first record; values without spaces)."""
    line = next((ln for ln in text.splitlines() if "JobId=" in ln), "")
    return {k: v for k, v in re.findall(r"(?:^|\s)([\w/:]+)=(\S*)", line)}


def job_info_from_scontrol(job_id: str, text: str) -> JobInfo | None:
    f = parse_scontrol(text)
    if "JobState" not in f:
        return None
    return JobInfo(job_id, normalise_state(f["JobState"]), f.get("ExitCode", ""), f.get("Reason", ""), "scontrol")


def job_info_from_sacct(job_id: str, text: str, source: str = "sacct") -> JobInfo | None:
    """``sacct -n -P -o JobID,State,ExitCode[,Reason]`` → the job's own record (not its steps); the last one wins
    (job ids repeat across cluster restarts)."""
    found = None
    for line in text.splitlines():
        cols = line.strip().split("|")
        if len(cols) < 3 or not cols[0]:
            continue
        if cols[0] != str(job_id):
            continue  # steps: 123.batch, 123.0, 123.extern
        found = JobInfo(job_id, normalise_state(cols[1]), cols[2], cols[3] if len(cols) > 3 else "", source)
    return found


def state_commands(settings: SlurmSettings, job_id: str) -> list[tuple[str, list[str]]]:
    """The commands that tell a job's state, best first: scontrol (live jobs until MinJobAge), sacct -c (the
    jobcomp file: finished jobs), sacct (the accounting database, when there is one)."""
    return [
        ("scontrol", [settings.command("scontrol"), "show", "job", "-o", str(job_id)]),
        ("sacct -c", [settings.command("sacct"), "-c", "-n", "-P", "-j", str(job_id), "-o", "JobID,State,ExitCode"]),
        ("sacct", [settings.command("sacct"), "-n", "-P", "-X", "-j", str(job_id), "-o",
                   "JobID,State,ExitCode,Reason"]),
    ]


def interpret_state_output(job_id: str, source: str, rc: int, out: str) -> JobInfo | None:
    if rc != 0 or not out.strip():
        return None
    if source == "scontrol":
        return job_info_from_scontrol(job_id, out)
    return job_info_from_sacct(job_id, out, source)


def live_job_names(settings: SlurmSettings, *, timeout: float = 30.0) -> list[str]:
    """Names of this user's pending and running jobs (``squeue``); raises ``RuntimeError`` when squeue fails
    (a cap on concurrent jobs must not be skipped silently)."""
    import getpass

    argv = [settings.command("squeue"), "-h", "-u", getpass.getuser(), "-o", "%j"]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"squeue could not run: {e}") from None
    if p.returncode != 0:
        raise RuntimeError(f"squeue failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")
    return [line.strip() for line in p.stdout.splitlines() if line.strip()]


def job_state(settings: SlurmSettings, job_id: str, *, timeout: float = 30.0) -> JobInfo:
    """The job's state from the first source that knows it (blocking)."""
    for source, argv in state_commands(settings, job_id):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            continue
        info = interpret_state_output(job_id, source, p.returncode, p.stdout)
        if info is not None:
            return info
    return JobInfo(str(job_id), UNKNOWN_STATE)


async def run_command(argv: Sequence[str], *, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run a command without blocking the event loop; (rc, stdout, stderr); rc 127 when it cannot start."""
    try:
        p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        return 127, "", str(e)
    try:
        out, err = await asyncio.wait_for(p.communicate(), timeout)
    except asyncio.TimeoutError:
        p.kill()
        await p.wait()
        return 124, "", f"{argv[0]} timed out after {timeout} s"
    return p.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def async_job_state(settings: SlurmSettings, job_id: str, *, timeout: float = 30.0) -> JobInfo:
    """:func:`job_state` for the triggerer's event loop."""
    for source, argv in state_commands(settings, job_id):
        rc, out, _ = await run_command(argv, timeout=timeout)
        info = interpret_state_output(job_id, source, rc, out)
        if info is not None:
            return info
    return JobInfo(str(job_id), UNKNOWN_STATE)


def job_outcome(state: str, exit_code: str = "") -> tuple[bool, str]:
    """(success, description) for a final job state: only COMPLETED (with exit code 0) succeeds."""
    rc, sig = parse_exit_code(exit_code)
    ok = state == SUCCESS_STATE and not rc
    detail = f"exit code {rc}" + (f", signal {sig}" if sig else "") if rc is not None else "no exit code"
    return ok, f"{state} ({detail})"


def failure_message(job_id: str, job_name: str | None, state: str, exit_code: str, reason: str,
                    log_path: str | None, tail: str) -> str:
    """The task error for a job that did not complete: the state named first, then the log tail."""
    _, described = job_outcome(state, exit_code)
    what = {UNKNOWN_STATE: "is unknown to Slurm (scontrol and sacct do not know it)",
            WAIT_TIMEOUT_STATE: "was still not finished when the wait timed out (the job was cancelled)"}
    head = f"Slurm job {job_id}" + (f" ({job_name})" if job_name else "") + " "
    head += what.get(state, f"ended {described}")
    if reason and reason not in ("None", "(null)"):
        head += f", reason {reason}"
    if log_path:
        head += f"; log {log_path}"
    body = tail.rstrip("\n")
    return head + (":\n" + body if body else " (log empty or not readable)")


# ------------------------------------------------------------------------------------------------------ logs
def tail_file(path: str | os.PathLike | None, n: int = 40, *, max_bytes: int = 64 * 1024) -> str:
    """The last ``n`` lines of a text file ("" when it does not exist); reads at most ``max_bytes`` from the end."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(lines[-n:]) + ("\n" if lines else "") if n > 0 else ""


def read_from(path: str | os.PathLike | None, offset: int, *, max_bytes: int = 1024 * 1024,
              final: bool = False) -> tuple[str, int]:
    """Complete lines of a file from byte ``offset`` (at most ``max_bytes``); (text, new offset). A partial last
    line stays unread until it is finished, unless ``final``."""
    if not path:
        return "", offset
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(max_bytes)
    except OSError:
        return "", offset
    cut = len(data) if final else data.rfind(b"\n") + 1
    if cut == 0 and len(data) < max_bytes:
        return "", offset
    cut = cut or len(data)
    return data[:cut].decode(errors="replace"), offset + cut
