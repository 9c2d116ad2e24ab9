#!/usr/bin/env bash
# Entry point of the agentpipe-airflow image (the Airflow containers of docker/compose.yaml).
#
#   airflow-entrypoint.sh api-server --port 8080     # runs `airflow api-server --port 8080`
#   airflow-entrypoint.sh bash -c "airflow db migrate && …"   # airflow, bash, sh, python, python3: run as given
#
# Before that, every container:
# 1. refuses to start while AIRFLOW_ADMIN_PASSWORD, POSTGRES_PASSWORD (when given) or the JWT secret (compose: AIRFLOW_JWT_SECRET) is missing or
#    still the example value: the examples are public, and whoever knows the JWT secret can mint an admin token;
# 2. writes the simple auth manager's passwords file, {"admin": AIRFLOW_ADMIN_PASSWORD} with mode 0600, at
#    $AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE (default $AIRFLOW_HOME/simple_auth_manager_passwords.json),
#    so the documented login works: without it Airflow invents a password and prints it in the container log;
# 3. with a munge key mounted (compose: MUNGE_KEY_FILE → $AGENTPIPE_MUNGE_KEY, default /etc/agentpipe/munge.key),
#    installs it for the munge user and starts munged, which sbatch, squeue, scontrol and sacct authenticate through;
# 4. with AGENTPIPE_COMPUTE=slurm, refuses to start without slurm.conf ($SLURM_CONF, default /etc/slurm/slurm.conf;
#    compose: SLURM_CONF_DIR) or, unless slurm.conf chooses AuthType=auth/slurm, without the munge key.
# Nothing secret is printed; the admin password is removed from the environment the tasks inherit.
set -euo pipefail

fail() { echo "airflow-entrypoint: $*" >&2; exit 2; }

case "${AIRFLOW_ADMIN_PASSWORD:-}" in
  ''|change-me) fail "AIRFLOW_ADMIN_PASSWORD is missing, empty or the example 'change-me': set it in docker/.env" ;;
esac
case "${POSTGRES_PASSWORD-unset}" in  # compose passes docker/.env to every Airflow container
  ''|change-me) fail "POSTGRES_PASSWORD is empty or the example 'change-me': set it in docker/.env" ;;
esac
case "${AIRFLOW__API_AUTH__JWT_SECRET:-}" in
  ''|change-me*) fail "AIRFLOW_JWT_SECRET is missing, empty or the example value: set a random one in docker/.env" ;;
esac

default_pwfile="${AIRFLOW_HOME:-/opt/airflow}/simple_auth_manager_passwords.json"
pwfile="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-$default_pwfile}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$pwfile"
mkdir -p "$(dirname "$pwfile")"
# JSON-encoded by Python (any character is safe), read from the environment (never a command-line argument, which
# `ps` shows), created 0600 and moved into place so no reader ever sees a partial file
python3 - "$pwfile" <<'PY'
import json
import os
import sys

path = sys.argv[1]
tmp = f"{path}.tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, f)
os.chmod(tmp, 0o600)  # a stale .tmp keeps its old mode through os.open
os.replace(tmp, path)
PY
unset AIRFLOW_ADMIN_PASSWORD

munge_key="${AGENTPIPE_MUNGE_KEY:-/etc/agentpipe/munge.key}"
slurm_conf="${SLURM_CONF:-/etc/slurm/slurm.conf}"
have_key=no
# compose mounts /dev/null when MUNGE_KEY_FILE is unset: only a non-empty regular file is a key
if [ -f "$munge_key" ] && [ -s "$munge_key" ]; then
  # munged accepts only a key owned by its own user and unreadable by others; the mounted file belongs to the
  # host's owner, so a copy is installed. /run/munge (the socket) is made by systemd on a host, not in a container.
  install -d -o munge -g munge -m 0755 /run/munge
  install -o munge -g munge -m 0400 "$munge_key" /etc/munge/munge.key
  # --force: a restarted container still has the previous munged's socket lock, which munged otherwise refuses
  runuser -u munge -- munged --force
  if ! munge -n >/dev/null 2>&1; then
    fail "munged did not start with the key from MUNGE_KEY_FILE; see /var/log/munge/munged.log"
  fi
  have_key=yes
fi
if [ "${AGENTPIPE_COMPUTE:-local}" = slurm ]; then
  if ! [ -f "$slurm_conf" ] || ! [ -s "$slurm_conf" ]; then
    fail "AGENTPIPE_COMPUTE=slurm needs the cluster's slurm.conf: set SLURM_CONF_DIR in docker/.env (no $slurm_conf)"
  fi
  if [ "$have_key" = no ] && ! grep -qiE '^[[:space:]]*AuthType[[:space:]]*=[[:space:]]*auth/slurm' "$slurm_conf"; then
    fail "AGENTPIPE_COMPUTE=slurm needs the cluster's munge key: set MUNGE_KEY_FILE in docker/.env"
  fi
fi

case "${1:-}" in
  airflow|bash|sh|python|python3) exec "$@" ;;
  *) exec airflow "$@" ;;
esac
