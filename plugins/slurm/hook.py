"""``SlurmHook``: submit, query, cancel and tail Slurm jobs through the stable CLI (sbatch, scontrol, sacct,
scancel) on the machine Airflow runs on (a submit host). Cluster settings come from the connection
``slurm_default`` (extras, see :class:`plugins.slurm.core.SlurmSettings` and plugins/README.md); without that
connection the documented defaults for the local single-node cluster apply (with a warning); a connection that
cannot be read raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from plugins.slurm.core import (
    JobInfo,
    SlurmSettings,
    job_environment,
    job_state,
    parse_sbatch_output,
    render_batch_script,
    sbatch_command,
    sbatch_environment,
    slurm_constraint,
    tail_file,
)
from plugins.slurm.resources import GPU_CLASSES, Resources


class SlurmError(RuntimeError):
    """A Slurm command failed (sbatch rejected the job, the controller is unreachable, …)."""


class SlurmHook(BaseHook):
    """Talks to Slurm with its command-line tools.

    :param slurm_conn_id: Airflow connection whose extras hold the cluster settings (``slurm_default``).
    :param settings: explicit settings (skips the connection lookup; for tests and scripts).
    """

    conn_name_attr = "slurm_conn_id"
    default_conn_name = "slurm_default"
    conn_type = "slurm"
    hook_name = "Slurm"

    def __init__(self, slurm_conn_id: str = default_conn_name, *, settings: SlurmSettings | None = None) -> None:
        super().__init__()
        self.slurm_conn_id = slurm_conn_id
        if settings is not None:
            self.__dict__["settings"] = settings

    @cached_property
    def settings(self) -> SlurmSettings:
        """The connection's extras as settings; the documented local defaults when the connection does not
        exist (a warning); a connection that cannot be read raises :class:`SlurmError`."""
        return load_settings(self.slurm_conn_id, log=self.log)

    # ------------------------------------------------------------------------------------------------ submit
    def submit(self, script_or_command: str | Sequence[str], *, job_name: str, output: str,
               resources: Resources | Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
               workdir: str | None = None, script_dir: str | os.PathLike | None = None) -> str:
        """Submit one batch job; returns its id.

        :param script_or_command: an argv list (written into a generated batch script), a batch script text
            (starts with ``#!``) or a shell command line (``sbatch --wrap``).
        :param job_name: the Slurm job name (already sanitised, see ``core.sanitize_job_name``).
        :param output: the job's stdout+stderr file (``%j`` = job id); its folder is created.
        :param resources: the resource rule's result (or a dict with its keys).
        :param env: extra variables for the job (they win over the allow-listed ones taken from this process).
            Values, secrets included, reach the job through sbatch's environment, never through the script file.
        :param workdir: the job's working directory (``--chdir``); default: the connection's ``workdir``.
        :param script_dir: where generated batch scripts go (default: beside ``output``).
        """
        s = self.settings
        res = resources.as_dict() if isinstance(resources, Resources) else dict(resources or {})
        if res.get("gpu_constraint") in GPU_CLASSES and res.get("gpu_constraint") not in s.gpu_constraints \
                and not res.get("constraint"):
            self.log.warning("resource rule asks for a '%s' GPU but the connection %s has no gpu_constraints "
                             "entry for it: submitting without a constraint", res["gpu_constraint"],
                             self.slurm_conn_id)
        job_env = job_environment(os.environ, {**s.env, **(env or {})}, pass_through=s.export_env, venv=s.venv)
        workdir = workdir or s.workdir
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        script = wrap = None
        if isinstance(script_or_command, str) and not script_or_command.startswith("#!"):
            wrap = script_or_command
        else:
            text = script_or_command if isinstance(script_or_command, str) else \
                render_batch_script(script_or_command, setup=s.setup)
            folder = Path(script_dir or Path(output).parent)
            folder.mkdir(parents=True, exist_ok=True)
            fd, script = tempfile.mkstemp(prefix=f"{job_name[:100]}.", suffix=".sbatch", dir=folder)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.chmod(script, 0o750)
        argv = sbatch_command(s, res, job_name=job_name, output=output, export=job_env.keys(), script=script,
                              wrap=wrap, workdir=workdir)
        self.log.info("sbatch: %s", " ".join(argv))  # names and flags only: no environment values
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                               env=sbatch_environment(job_env, os.environ))
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlurmError(f"sbatch could not run: {e}") from None
        if p.returncode != 0:
            raise SlurmError(f"sbatch rejected job {job_name} (exit {p.returncode}): "
                             f"{(p.stderr or p.stdout).strip()[-2000:]}")
        job_id = parse_sbatch_output(p.stdout)
        self.log.info("submitted Slurm job %s (%s), log %s", job_id, job_name, output.replace("%j", job_id))
        return job_id

    # ------------------------------------------------------------------------------------------------ query
    def state(self, job_id: str) -> JobInfo:
        """The job's state: ``scontrol show job -o``, else ``sacct -c`` (jobcomp), else ``sacct``; UNKNOWN when
        no source knows the job."""
        return job_state(self.settings, str(job_id))

    def cancel(self, job_id: str, *, signal: str | None = None) -> bool:
        """``scancel`` the job (optionally with a signal); True when scancel accepted it."""
        argv = [self.settings.command("scancel")] + ([f"--signal={signal}"] if signal else []) + [str(job_id)]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.log.warning("scancel %s failed: %s", job_id, e)
            return False
        if p.returncode != 0:
            self.log.warning("scancel %s: %s", job_id, (p.stderr or p.stdout).strip())
        else:
            self.log.info("scancel %s: cancel requested", job_id)
        return p.returncode == 0

    @staticmethod
    def tail(log_path: str | os.PathLike | None, n: int = 40) -> str:
        """The last ``n`` lines of a job log ("" when it is missing)."""
        return tail_file(log_path, n)

    def constraint_for(self, resources: Mapping[str, Any]) -> str | None:
        """The --constraint the connection maps ``resources`` to (for logs and tests)."""
        return slurm_constraint(self.settings, resources)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form: only extras matter (cluster settings as JSON)."""
        return {"hidden_fields": ["host", "schema", "login", "password", "port"],
                "relabeling": {"extra": "Cluster settings (JSON, see plugins/README.md)"}}


def load_settings(conn_id: str = SlurmHook.default_conn_name, *, log: Any = None) -> SlurmSettings:
    """Settings from the connection's extras; the documented local defaults (plugins/README.md) only when no
    connection of that id is defined, with a warning. Any other failure to read it (a secrets backend that
    raises, extras that are not a JSON object, unknown or invalid keys) raises :class:`SlurmError`."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        if log is not None:
            log.warning("no Airflow connection '%s': using the local Slurm defaults documented in "
                        "plugins/README.md (%s)", conn_id, SlurmSettings())
        return SlurmSettings()
    except Exception as e:  # re-raised: anything but "not defined" must not turn into the local defaults
        raise SlurmError(f"Airflow connection '{conn_id}' could not be read ({type(e).__name__}: {e}); "
                         f"fix it or delete it to use the local defaults") from e
    return settings_from_connection(conn_id, conn.extra)


def settings_from_connection(conn_id: str, extra: str | None) -> SlurmSettings:
    """Parse a connection's raw ``extra`` text (Airflow's ``extra_dejson`` turns malformed JSON into ``{}``,
    which would silently mean the defaults)."""
    try:
        extras = json.loads(extra) if extra and extra.strip() else {}
    except json.JSONDecodeError as e:
        raise SlurmError(f"Airflow connection '{conn_id}': extra is not valid JSON ({e})") from None
    if not isinstance(extras, dict):
        raise SlurmError(f"Airflow connection '{conn_id}': extra must be a JSON object, "
                         f"got {type(extras).__name__}")
    try:
        return SlurmSettings.from_extras(extras)
    except (TypeError, ValueError) as e:
        raise SlurmError(f"Airflow connection '{conn_id}': invalid extra ({e})") from None
