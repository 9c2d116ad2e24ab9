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
    echo "mlflow up on http://$host:$port (pid $(cat "$pidfile"), state $MLFLOW_STATE)"
    exit 0
  fi
  kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "mlflow exited; see $MLFLOW_STATE/mlflow.log" >&2; tail -20 "$MLFLOW_STATE/mlflow.log" >&2; exit 1; }
  sleep 0.5
done
echo "mlflow not healthy after 120 s; see $MLFLOW_STATE/mlflow.log" >&2
exit 1
