#!/usr/bin/env bash
# Start the MLflow tracking server used by agentpipe: the same script serves the demo (SQLite + local
# artifacts under $AGENTPIPE_HOME/mlflow) and a team deployment (a Postgres URI, S3/NFS artifacts).
#
#   mlflow/start.sh                 # foreground (containers, systemd, Slurm)
#   mlflow/start.sh --daemon        # background: PID in $MLFLOW_STATE/mlflow.pid, log in mlflow.log, waits for /health
#
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///$MLFLOW_STATE/mlflow.db  (e.g. postgresql://user:pw@db/mlflow)
#   MLFLOW_ARTIFACTS_DESTINATION  default $MLFLOW_STATE/artifacts           (e.g. s3://bucket/mlflow or /nfs/mlflow)
#   MLFLOW_HOST / MLFLOW_PORT     default 127.0.0.1 / 5000
#   MLFLOW_WORKERS                default 1
#   MLFLOW_STATE                  default $AGENTPIPE_HOME/mlflow (AGENTPIPE_HOME default ./runs)
# Authentication (MLflow's basic-auth app: users, passwords, per-experiment permissions; off by default):
#   MLFLOW_AUTH                   basic | none; default basic when MLFLOW_AUTH_ADMIN_PASSWORD is set, else none
#   MLFLOW_AUTH_ADMIN_USERNAME    default admin
#   MLFLOW_AUTH_ADMIN_PASSWORD    required with basic (at least 12 characters): MLflow creates the admin user with
#                                 it on the first start against an empty auth database and ignores it afterwards
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a signed-in user may do where nobody granted more: READ (default), USE,
#                                 EDIT, MANAGE or NO_PERMISSIONS; anonymous requests are refused (401) either way
#   MLFLOW_AUTH_DATABASE_URI      users and permissions; default sqlite:///$MLFLOW_STATE/basic_auth.db
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key, the same in every worker; default generated once into
#                                 $MLFLOW_STATE/flask-secret-key (0600)
# The generated auth configuration, $MLFLOW_STATE/basic_auth.ini (0600), holds no password: MLflow reads the admin
# password from MLFLOW_AUTH_ADMIN_PASSWORD itself. Clients authenticate with MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD. /health stays open (MLflow exempts it), so the --daemon wait below works with auth on.
# Server-side job execution is off: the pipeline needs none of it, and it costs ~1 GB of RAM in workers.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MLFLOW_STATE="${MLFLOW_STATE:-${AGENTPIPE_HOME:-$here/../runs}/mlflow}"
mkdir -p "$MLFLOW_STATE"
MLFLOW_STATE="$(cd "$MLFLOW_STATE" && pwd)"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_STATE/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_STATE/artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-1}"
mlflow_bin="${MLFLOW_BIN:-$(command -v mlflow || echo "$here/../.venv/bin/mlflow")}"
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
cmd=("$mlflow_bin" server --backend-store-uri "$backend" --artifacts-destination "$artifacts"
     --host "$host" --port "$port" --workers "$workers")

fail() { echo "mlflow/start.sh: $*" >&2; exit 2; }

# a password alone turns authentication on: setting one and still serving everyone would be the surprising choice
auth="${MLFLOW_AUTH:-}"
[ -n "$auth" ] || { [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && auth=basic || auth=none; }
case "$auth" in
  none) ;;
  basic)
    password="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
    # MLflow itself refuses passwords under 12 characters, with a traceback; say it in one line first
    if [ -z "$password" ] || [ "$password" = change-me ] || [ "${#password}" -lt 12 ]; then
      fail "MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD: at least 12 characters, not the example value"
    fi
    unset password
    admin="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
    case "$admin" in ''|*[[:space:]]*) fail "MLFLOW_AUTH_ADMIN_USERNAME must be a non-empty name without spaces" ;; esac
    permission="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
    case "$permission" in
      READ|USE|EDIT|MANAGE|NO_PERMISSIONS) ;;
      *) fail "MLFLOW_AUTH_DEFAULT_PERMISSION must be READ, USE, EDIT, MANAGE or NO_PERMISSIONS, not '$permission'" ;;
    esac
    auth_db="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$MLFLOW_STATE/basic_auth.db}"
    case "$auth_db" in *$'\n'*) fail "MLFLOW_AUTH_DATABASE_URI must be one line" ;; esac
    # the basic-auth app fails at import without Flask-WTF (the mlflow[auth] extra); say so before it does
    py="$(dirname "$mlflow_bin")/python"
    if [ -x "$py" ] && ! "$py" -c "import flask_wtf" 2>/dev/null; then
      fail "MLFLOW_AUTH=basic needs Flask-WTF (mlflow[auth]) in the environment of $mlflow_bin"
    fi
    conf="$MLFLOW_STATE/basic_auth.ini"
    # 0600 from the start: the database URI may hold credentials. configparser expands %, so URL-encoded
    # characters in the URI (%40 …) are written as %%.
    (umask 077 && cat > "$conf.tmp" <<INI
# written by mlflow/start.sh on every start; edit the environment, not this file
[mlflow]
default_permission = $permission
database_uri = ${auth_db//%/%%}
admin_username = ${admin//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    )
    chmod 600 "$conf.tmp" && mv -f "$conf.tmp" "$conf"
    export MLFLOW_AUTH_CONFIG_PATH="$conf"
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
      # static across workers and restarts, as the CSRF check requires; kept beside the state, never printed
      keyfile="$MLFLOW_STATE/flask-secret-key"
      if [ ! -s "$keyfile" ]; then
        (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$keyfile")
      fi
      MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$keyfile")"
      export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    cmd+=(--app-name basic-auth)
    # the server creates its login database (password hashes) with this process's umask: owner-only
    umask 077
    ;;
  *) fail "MLFLOW_AUTH must be basic or none, not '$auth'" ;;
esac

if [ "${1:-}" != "--daemon" ]; then
  exec "${cmd[@]}"
fi
pidfile="$MLFLOW_STATE/mlflow.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "mlflow already running (pid $(cat "$pidfile")) on http://$host:$port"
  exit 0
fi
setsid "${cmd[@]}" >"$MLFLOW_STATE/mlflow.log" 2>&1 < /dev/null &
echo $! > "$pidfile"
for _ in $(seq 1 240); do
  if curl -fsS "http://$host:$port/health" >/dev/null 2>&1; then
    echo "mlflow up on http://$host:$port (pid $(cat "$pidfile"), state $MLFLOW_STATE, auth $auth)"
    exit 0
  fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "mlflow exited; see $MLFLOW_STATE/mlflow.log" >&2
    tail -20 "$MLFLOW_STATE/mlflow.log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "mlflow not healthy after 120 s; see $MLFLOW_STATE/mlflow.log" >&2
exit 1
