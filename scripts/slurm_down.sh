#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by scripts/slurm_up.sh (slurmctld, slurmd, and slurmdbd/MariaDB when
# started, then munged). Safe to run when nothing is running. Only stops the daemons slurm_up.sh starts, by the
# pid files they write.
set -u
stop_pidfile() {  # pidfile [name]: SIGTERM the process in pidfile and wait up to 10 s for it to exit
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$f"
}
if command -v scontrol >/dev/null && pgrep -x slurmctld >/dev/null; then
  scontrol shutdown >/dev/null 2>&1 || true                   # slurmctld + slurmd
  for i in $(seq 1 40); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.25; done
fi
stop_pidfile /run/slurm/slurmctld.pid
stop_pidfile /run/slurm/slurmd.pid
stop_pidfile /run/slurm/slurmdbd.pid
stop_pidfile /run/mysqld/mysqld.pid
stop_pidfile /run/munge/munged.pid
echo "slurm down"
