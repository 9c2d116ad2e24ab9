"""Slurm compute logic without a cluster or an Airflow runtime: the resource rule, sbatch command and batch-script
building (secrets never in the script), scontrol/sacct parsing, states → outcome, settings from connection extras."""

from __future__ import annotations

import pytest

from plugins.slurm.core import (
    JOB_ENV_NAMES,
    TERMINAL_STATES,
    UNKNOWN_STATE,
    WAIT_TIMEOUT_STATE,
    JobInfo,
    SlurmSettings,
    expand_log_path,
    failure_message,
    job_environment,
    job_info_from_sacct,
    job_info_from_scontrol,
    job_outcome,
    normalise_state,
    parse_exit_code,
    parse_sbatch_output,
    read_from,
    render_batch_script,
    sanitize_job_name,
    sbatch_command,
    sbatch_environment,
    tail_file,
)
from plugins.slurm.resources import Resources, model_size_b, models_from_spec, resources_for

SECRET = "sk-proj-THISisAsecretVALUE0123456789"

# ------------------------------------------------------------------------------------------------ resource rule


@pytest.mark.parametrize(("model", "size"), [
    ("Qwen3-8B", 8), ("Qwen/Qwen3-8B", 8), ("Qwen3-8Bnt", 8), ("Qwen3-30B", 30), ("Llama3.2-3B", 3),
    ("Llama3.3-70B", 70), ("meta-llama/Llama-3.1-70B-Instruct", 70), ("Qwen2.5-7B", 7), ("Yi-1.5-34B", 34),
    ("Phi-4", 14), ("Phi-4-mini", 4), ("Phi-4-rplus", 14), ("microsoft/Phi-4-reasoning", 14),
    ("Mixtral-8x7B", 56), ("vllm:Qwen3-14B", 14), ("SmolLM2-135M", 0.135), ("tiny-llama", 0.001),
    ("gpt-5-mini", 0), ("openai:gpt-4o", 0), ("scripted:agent", 0),
    ("Qwen3-8B+runs/models/q8_safe_s0/adapter", 12),                      # an adapter adds 4 B (study rule)
    ("/runs/dpo_merged/Llama-8B_int4_safe_s0", 8),                        # study layout: the nickname's size
    ("/data/models/Qwen3-14B_help_s1/merged", 14),
])
def test_model_size(model, size):
    assert model_size_b(model) == pytest.approx(size)


def test_model_size_unknown_local_model_is_none():
    assert model_size_b("/some/where/my-model") is None


def test_rule_qwen3_8b_unquantized_is_one_normal_gpu():
    r = resources_for(["Qwen3-8B", "gpt-5-mini"], "none", "emulate")
    assert (r.gpus, r.gpu_constraint, r.tier, r.mem, r.time) == (1, None, "gpu", "8G", "03:00:00")


def test_rule_llama_70b_int4_needs_a_big_gpu():
    r = resources_for(["Llama3.3-70B"], "int4", "emulate")
    assert (r.gpus, r.gpu_constraint, r.tier) == (1, "big", "big")


@pytest.mark.parametrize(("models", "quant", "big"), [
    (["Qwen3-14B", "Qwen3-8B"], "none", False),   # 22 B ≤ 24
    (["Qwen3-14B", "Qwen3-14B"], "none", True),   # 28 B > 24
    (["Qwen3-32B"], "fp16", True),
    (["Qwen3-32B"], "int8", False),               # ≤ 35
    (["Yi-1.5-34B", "Qwen3-8B"], "int8", True),   # 42 > 35
    (["Llama3.3-70B"], "int8", True),
    (["Qwen3-32B", "Qwen3-32B"], "int4", False),  # 64 ≤ 65
    (["Llama3.1-70B"], "int4", True),             # 70 > 65
])
def test_rule_thresholds(models, quant, big):
    assert (resources_for(models, quant, "emulate").gpu_constraint == "big") is big


def test_rule_api_only_is_a_cpu_job():
    r = resources_for(["gpt-5-mini", "openai:gpt-5"], None, "emulate")
    assert (r.gpus, r.gpu_constraint, r.tier) == (0, None, "cpu")


def test_rule_small_local_model_is_a_cpu_job():
    r = resources_for(["SmolLM2-135M", "gpt-5-mini"], None, "emulate")
    assert (r.gpus, r.tier) == (0, "small")
    assert resources_for(["tiny-llama"], None, "train").mem == "8G"  # not the 100G of a real training job


def test_rule_unknown_size_local_model_gets_a_gpu():
    assert resources_for(["/models/custom"], None, "emulate").gpus == 1


def test_rule_stage_defaults_and_cpu_stages():
    train = resources_for(["Qwen3-8B"], None, "train")
    assert (train.time, train.mem, train.cpus, train.gpus) == ("3-00:00:00", "100G", 8, 1)
    assert resources_for(["Qwen3-8B"], None, "evaluate repair").time == "02:00:00"
    assert resources_for(["Qwen3-8B"], None, ["evaluate"]).time == "04:00:00"
    assert resources_for(["Qwen3-8B"], None, "merge").time == "00:30:00"
    assert resources_for(["Llama3.3-70B"], None, "analyze all").gpus == 0  # CPU-only stage
    unknown = resources_for([], None, "something-new", default_time="01:00:00", default_mem="2G")
    assert (unknown.time, unknown.mem) == ("01:00:00", "2G")


def test_rule_rejects_an_unknown_quantization():
    with pytest.raises(ValueError, match="quantization"):
        resources_for(["Qwen3-8B"], "int3", "emulate")


def test_overrides():
    r = resources_for(["Llama3.3-70B"], "int4", "emulate").override({"gpus": 2, "mem": "64G", "partition": "gpu"})
    assert (r.gpus, r.gpu_constraint, r.mem, r.partition) == (2, "big", "64G", "gpu")
    assert r.override({"gpus": 0}).gpu_constraint is None
    with pytest.raises(ValueError, match="unknown key"):
        r.override({"memory": "1G"})


def test_models_from_spec():
    spec = {"agent": "Qwen3-8B", "emulator": "gpt-5-mini", "evaluator": "none", "cases": "0-2",
            "models": ["Phi-4", "Qwen3-14B"]}
    assert models_from_spec(spec) == ["Qwen3-8B", "gpt-5-mini", "Phi-4", "Qwen3-14B"]


# ---------------------------------------------------------------------------------------------- sbatch / script


def test_sbatch_command_flags_from_resources_and_settings():
    s = SlurmSettings(partition="main", gpu_partition="gpu", account="lab", qos="normal",
                      gpu_constraints={"big": "a100_80gb"}, gres="gpu:a100:{gpus}",
                      extra_sbatch_args=("--exclude=n13",))
    res = resources_for(["Llama3.3-70B"], "int4", "emulate").as_dict()
    argv = sbatch_command(s, res, job_name="d.t.r", output="/logs/d.t.r-%j.out", export=["PATH", "HOME"],
                          script="/logs/job.sbatch", workdir="/runs")
    assert argv[:2] == ["sbatch", "--parsable"]
    for flag in ("--job-name=d.t.r", "--output=/logs/d.t.r-%j.out", "--open-mode=append", "--partition=gpu", "--account=lab",
                 "--qos=normal", "--gres=gpu:a100:1", "--constraint=a100_80gb", "--mem=8G", "--time=03:00:00",
                 "--chdir=/runs", "--export=HOME,PATH", "--exclude=n13", "--signal=B:TERM@300"):
        assert flag in argv
    assert argv[-1] == "/logs/job.sbatch" and "--requeue" not in argv
    from plugins.slurm.core import signal_grace, time_limit_seconds

    assert [time_limit_seconds(t) for t in ("30", "05:00", "03:00:00", "3-00", "1-02:03:04")] == [
        1800, 300, 10800, 259200, 93784]
    assert (signal_grace(300, "00:05:00"), signal_grace(300, "00:01:00"), signal_grace(300, None)) == (30, 0, 300)
    tuned = sbatch_command(SlurmSettings.from_extras({"signal_grace": "60", "requeue": True}), res, job_name="j",
                           output="o", export=[], wrap="true")
    assert "--signal=B:TERM@60" in tuned and "--requeue" in tuned
    assert not any(a.startswith("--signal") for a in sbatch_command(SlurmSettings(signal_grace=0), res,
                                                                    job_name="j", output="o", export=[],
                                                                    wrap="true"))
    cpu = sbatch_command(s, Resources().as_dict(), job_name="j", output="o", export=[], wrap="echo hi")
    assert "--partition=main" in cpu and not any(a.startswith(("--gres", "--constraint")) for a in cpu)
    assert cpu[-2:] == ["--wrap", "echo hi"] and "--export=NONE" in cpu


def test_sbatch_command_unmapped_big_class_has_no_constraint_and_literal_ones_pass():
    res = resources_for(["Llama3.3-70B"], "none", "emulate").as_dict()
    assert not any(a.startswith("--constraint") for a in
                   sbatch_command(SlurmSettings(), res, job_name="j", output="o", export=[], script="s"))
    lit = sbatch_command(SlurmSettings(), {**res, "constraint": "h100"}, job_name="j", output="o", export=[],
                         script="s")
    assert "--constraint=h100" in lit
    with pytest.raises(ValueError):
        sbatch_command(SlurmSettings(), res, job_name="j", output="o", export=[])


def test_secrets_reach_the_job_by_name_only():
    base = {"PATH": "/usr/bin", "HOME": "/root", "OPENAI_API_KEY": SECRET, "AWS_SECRET_ACCESS_KEY": "nope",
            "AGENTPIPE_HOME": "/runs", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "RANDOM_VAR": "x",
            "SLURM_CONF": "/etc/slurm/slurm.conf", "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz"}
    env = job_environment(base, {"AGENTPIPE_MLFLOW_PARENT_RUN_ID": "abc"}, venv="/opt/venv")
    assert env["OPENAI_API_KEY"] == SECRET and env["HF_TOKEN"].startswith("hf_")
    assert "AWS_SECRET_ACCESS_KEY" not in env and "RANDOM_VAR" not in env  # not allow-listed
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["AGENTPIPE_MLFLOW_PARENT_RUN_ID"] == "abc"
    assert job_environment(base, pass_through=["RANDOM_VAR"])["RANDOM_VAR"] == "x"
    script = render_batch_script(["/venv/bin/agentpipe", "--result", "r.json", "emulate", "--spec", "s j.json"],
                                 setup=["module load cuda"])
    argv = sbatch_command(SlurmSettings(), Resources().as_dict(), job_name="j", output="o", export=env.keys(),
                          script="/tmp/x.sbatch")
    assert SECRET not in script and SECRET not in " ".join(argv) and "hf_abc" not in " ".join(argv)
    assert "OPENAI_API_KEY" in next(a for a in argv if a.startswith("--export="))
    assert "exec /venv/bin/agentpipe --result r.json emulate --spec 's j.json'" in script
    assert "module load cuda" in script and script.startswith("#!/bin/bash\n")
    sb_env = sbatch_environment(env, base)
    assert sb_env["SLURM_CONF"] == "/etc/slurm/slurm.conf" and sb_env["OPENAI_API_KEY"] == SECRET
    assert {"PATH", "HOME", "AGENTPIPE_*", "MLFLOW_*", "OPENAI_API_KEY"} <= set(JOB_ENV_NAMES)


def test_job_names_and_log_paths():
    name = sanitize_job_name("toolemu_evaluation", "emulate", "manual__2026-01-02T03:04:05.123+00:00", 3)
    assert name == "toolemu_evaluation.emulate.manual__2026-01-02T03_04_05.123_00_00.3"
    assert sanitize_job_name("a b", "c/d") == "a_b.c_d"
    assert len(sanitize_job_name("x" * 500)) == 200
    assert expand_log_path("/l/%x-%j.out", "42", "n") == "/l/n-42.out"
    assert expand_log_path("/l/100%%-%j", "7") == "/l/100%-7"


def test_parse_sbatch_output():
    assert parse_sbatch_output("123\n") == "123"
    assert parse_sbatch_output("456;cluster\n") == "456"
    with pytest.raises(ValueError):
        parse_sbatch_output("sbatch: error: Batch job submission failed\n")


# ----------------------------------------------------------------------------------------------------- states

SCONTROL_FAILED = (
    "JobId=3 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901757 Nice=0 Account=(null) "
    "QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=3:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-11-24T21:42:36 "
    "Partition=debug AllocNode:Sid=localhost:12347 NodeList=localhost TRES=cpu=1,mem=23081M,node=1,billing=1 "
    "Command=(null) WorkDir=/work/main StdErr=/tmp/o-3.out StdIn=/dev/null StdOut=/tmp/o-3.out Power= \n")


def test_parse_scontrol():
    info = job_info_from_scontrol("3", SCONTROL_FAILED)
    assert info == JobInfo("3", "FAILED", "3:0", "NonZeroExitCode", "scontrol")
    assert (info.return_code, info.signal, info.terminal) == (3, 0, True)
    running = SCONTROL_FAILED.replace("JobState=FAILED", "JobState=RUNNING").replace("ExitCode=3:0", "ExitCode=0:0")
    assert not job_info_from_scontrol("3", running).terminal
    cancelled = SCONTROL_FAILED.replace("JobState=FAILED", "JobState=CANCELLED").replace("3:0", "0:15")
    assert (job_info_from_scontrol("3", cancelled).state, job_info_from_scontrol("3", cancelled).signal) == \
        ("CANCELLED", 15)
    assert job_info_from_scontrol("3", "slurm_load_jobs error: Invalid job id specified\n") is None


def test_parse_sacct():
    out = "7|CANCELLED by 0|0:0\n7.batch|CANCELLED|0:15\n"
    assert job_info_from_sacct("7", out, "sacct -c") == JobInfo("7", "CANCELLED", "0:0", "", "sacct -c")
    # job ids repeat after a cluster restart: the last record wins
    assert job_info_from_sacct("2", "2|COMPLETED|0:0\n2|FAILED|1:0\n").state == "FAILED"
    assert job_info_from_sacct("9", "") is None
    assert job_info_from_sacct("9", "10|COMPLETED|0:0\n") is None
    assert job_info_from_sacct("5", "5|OUT_OF_MEMORY|0:125|None\n").state == "OUT_OF_MEMORY"


@pytest.mark.parametrize(("raw", "state"), [("CANCELLED by 1000", "CANCELLED"), ("CD", "COMPLETED"),
                                            ("TO", "TIMEOUT"), ("OOM", "OUT_OF_MEMORY"), ("running", "RUNNING"),
                                            ("COMPLETED+", "COMPLETED"), ("", UNKNOWN_STATE)])
def test_normalise_state(raw, state):
    assert normalise_state(raw) == state


def test_parse_exit_code():
    assert parse_exit_code("3:0") == (3, 0)
    assert parse_exit_code("0:15") == (0, 15)
    assert parse_exit_code("") == (None, None)


def test_terminal_states_are_the_documented_set():
    assert TERMINAL_STATES == {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "PREEMPTED",
                               "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


@pytest.mark.parametrize(("state", "code", "ok"), [
    ("COMPLETED", "0:0", True), ("COMPLETED", "", True), ("COMPLETED", "1:0", False), ("FAILED", "2:0", False),
    ("CANCELLED", "0:15", False), ("TIMEOUT", "0:0", False), ("OUT_OF_MEMORY", "0:125", False),
    ("PREEMPTED", "0:0", False), ("NODE_FAIL", "0:0", False), ("BOOT_FAIL", "", False), ("DEADLINE", "", False),
    (UNKNOWN_STATE, "", False), (WAIT_TIMEOUT_STATE, "", False),
])
def test_outcome(state, code, ok):
    success, described = job_outcome(state, code)
    assert success is ok and described.startswith(state)


def test_failure_message_names_the_state_and_shows_the_tail():
    msg = failure_message("12", "d.t.r", "FAILED", "2:0", "NonZeroExitCode", "/l/x-12.out",
                          "[agentpipe] started\nagentpipe: error: case set 'nope': expected …\n")
    assert msg.splitlines()[0] == ("Slurm job 12 (d.t.r) ended FAILED (exit code 2), reason NonZeroExitCode; "
                                   "log /l/x-12.out:")
    assert msg.splitlines()[-1] == "agentpipe: error: case set 'nope': expected …"
    assert "cancelled" in failure_message("1", None, WAIT_TIMEOUT_STATE, "", "", None, "")
    assert "unknown to Slurm" in failure_message("1", None, UNKNOWN_STATE, "", "", None, "")


# ---------------------------------------------------------------------------------------------- logs, settings


def test_tail_and_incremental_reads(tmp_path):
    log = tmp_path / "job.out"
    assert tail_file(log) == "" and read_from(log, 0) == ("", 0)
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "partial")
    assert tail_file(log, 2) == "line 99\npartial\n"
    text, off = read_from(log, 0)
    assert text.endswith("line 99\n") and "partial" not in text
    text2, off2 = read_from(log, off, final=True)
    assert text2 == "partial" and off2 == log.stat().st_size


def test_settings_from_connection_extras():
    s = SlurmSettings.from_extras({"partition": "gpu", "account": "lab", "gpu_constraints": {"big": "a100_80g"},
                                   "extra_sbatch_args": "--exclude=n1 --nice=10", "setup": "module load cuda",
                                   "export_env": ["WANDB_API_KEY"], "initial_delay": "15", "venv": "/opt/venv"})
    assert s.extra_sbatch_args == ("--exclude=n1", "--nice=10") and s.setup == ("module load cuda",)
    assert s.initial_delay == 15.0 and s.gpu_constraints == {"big": "a100_80g"}
    assert s.agentpipe_executable() == "/opt/venv/bin/agentpipe"
    assert SlurmSettings(bin_dir="/opt/slurm/bin").command("sbatch") == "/opt/slurm/bin/sbatch"
    assert SlurmSettings().initial_delay == 10.0  # the Airflow 3 deferral race: keep ~10 s by default
    with pytest.raises(ValueError, match="unknown key"):
        SlurmSettings.from_extras({"partion": "gpu"})


def test_trigger_serializes_round_trip():
    from plugins.slurm.trigger import SlurmJobTrigger

    t = SlurmJobTrigger("42", log_path="/l/42.out", poll_interval=2, timeout=60)
    path, kwargs = t.serialize()
    assert path == "plugins.slurm.trigger.SlurmJobTrigger"
    assert SlurmJobTrigger(**kwargs).serialize() == (path, kwargs)
    assert kwargs["initial_delay"] == 10.0


def test_trigger_serialises_an_absolute_deadline_that_a_rebuild_does_not_extend():
    import time

    from plugins.slurm.trigger import SlurmJobTrigger

    before = time.time()
    _, kwargs = SlurmJobTrigger("42", log_path="/l/42.out", timeout=60).serialize()
    assert "timeout" not in kwargs and before + 60 <= kwargs["deadline"] <= time.time() + 60
    time.sleep(0.05)
    rebuilt = SlurmJobTrigger(**kwargs)  # what a restarted triggerer does
    assert rebuilt.deadline == kwargs["deadline"] and rebuilt.started_at == kwargs["started_at"]


def test_adapters_of_one_base_are_sized_once_and_vllm_quantizations_are_known():
    from plugins.slurm.resources import resources_for

    one = resources_for(["Qwen2.5-7B+/runs/models/a/adapter"], None, "emulate")
    many = resources_for([f"Qwen2.5-7B+/runs/models/m{k}/adapter" for k in range(12)], None, "emulate")
    assert many.size_b == one.size_b and many.tier == one.tier == "gpu"
    assert resources_for(["Qwen2.5-32B"], "fp8", "emulate").tier == "gpu"  # 32 B at a byte each: a normal GPU
    assert resources_for(["Qwen2.5-32B"], None, "emulate").tier == "big"
    assert resources_for(["vllm:Llama3.3-70B"], "awq", "emulate").tier == "big"  # 70 B > 65 B at 4 bits


def test_retries_know_the_failure():
    from plugins.slurm.core import doubled, retry_decision

    assert retry_decision("FAILED", "2:0") == (False, None)  # bad configuration: a retry fails the same way
    assert retry_decision("FAILED", "1:0") == (True, None)
    assert retry_decision("PREEMPTED", "0:15") == (True, None) and retry_decision("NODE_FAIL", "") == (True, None)
    assert retry_decision("TIMEOUT", "0:15") == (True, "time")
    assert retry_decision("TIMEOUT", "0:15", bumped={"time": "06:00:00"}) == (False, None)
    assert retry_decision("OUT_OF_MEMORY", "0:125") == (True, "mem")
    assert [doubled("time", t) for t in ("03:00:00", "1-12:00:00", "00:05:00")] == ["06:00:00", "3-00:00:00",
                                                                                   "00:10:00"]
    assert [doubled("mem", m) for m in ("8G", "100G", "512M", "1.5G")] == ["16G", "200G", "1024M", "3G"]


def test_slurm_connection_absent_means_the_documented_defaults_with_a_warning(monkeypatch):
    from plugins.slurm.hook import load_settings

    class Log:  # records levels (Airflow's structlog setup bypasses caplog)
        def __init__(self):
            self.lines = []

        def info(self, msg, *args):
            self.lines.append(("info", msg % args))

        def warning(self, msg, *args):
            self.lines.append(("warning", msg % args))

    monkeypatch.delenv("AIRFLOW_CONN_SLURM_TEST_ABSENT", raising=False)
    log = Log()
    assert load_settings("slurm_test_absent", log=log) == SlurmSettings()
    assert [level for level, _ in log.lines] == ["warning"]
    assert "'slurm_test_absent'" in log.lines[0][1] and "local Slurm defaults" in log.lines[0][1]


@pytest.mark.parametrize("extra, expected", [
    ("{not json", "extra is not valid JSON"),
    ('["partition"]', "extra must be a JSON object"),
    ('{"partiton": "gpu"}', "unknown key(s) partiton"),
    ('{"poll_interval": "often"}', "invalid extra"),
])
def test_slurm_connection_with_bad_extras_raises_naming_it(monkeypatch, extra, expected):
    import json

    from plugins.slurm.hook import SlurmError, SlurmHook
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_TEST_BAD", json.dumps({"conn_type": "generic", "extra": extra}))
    with pytest.raises(SlurmError) as err:
        SlurmHook("slurm_test_bad").settings
    assert "'slurm_test_bad'" in str(err.value) and expected in str(err.value)


def test_slurm_connection_lookup_failure_raises_instead_of_defaults(monkeypatch):
    from airflow.sdk import Connection

    from plugins.slurm.hook import SlurmError, load_settings

    def unreachable(conn_id):
        raise ConnectionError("secrets backend at vault:8200 unreachable")
    monkeypatch.setattr(Connection, "get", staticmethod(unreachable))
    with pytest.raises(SlurmError, match="'slurm_default' could not be read .*vault:8200 unreachable"):
        load_settings("slurm_default")


def test_slurm_connection_extras_are_used(monkeypatch):
    import json

    from plugins.slurm.hook import load_settings
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_TEST_GOOD", json.dumps({"conn_type": "generic",
                                                                   "extra": {"partition": "gpu"}}))
    assert load_settings("slurm_test_good").partition == "gpu"
