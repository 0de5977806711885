# shellcheck shell=bash
# PostgreSQL and an MLflow tracking server on loopback, for the tests marked `server`.
# Sourced by .ci/run (after the venv exists); exports GB10EXP_TEST_MLFLOW_URI and GB10EXP_TEST_PG_URI and
# stops both servers when the calling shell exits. `make test` sources it; by hand:
# source .ci/services.sh && .venv/bin/python -m pytest -m server
set -euo pipefail

GB10EXP_SERVICES_DIR=${GB10EXP_SERVICES_DIR:-/tmp/gb10exp-services}
PG_PORT=${PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-55000}
PG_PASSWORD=gb10exp-ci-only   # a loopback-only throwaway database
export GB10EXP_SERVICES_DIR   # tests read the server's artifact root under it

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")

# PostgreSQL refuses to run as root: run it as the `postgres` user when we are root.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

stop_services() {
    if [ -f "$GB10EXP_SERVICES_DIR/mlflow.pid" ]; then
        kill -- "-$(cat "$GB10EXP_SERVICES_DIR/mlflow.pid")" 2>/dev/null || true  # its whole process group
    fi
    if [ -d "$GB10EXP_SERVICES_DIR/pg/data" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$GB10EXP_SERVICES_DIR/pg/data" -m fast stop >/dev/null 2>&1 || true
    fi
}
stop_services  # a previous run's servers, if any
trap stop_services EXIT

rm -rf "$GB10EXP_SERVICES_DIR" && mkdir -p "$GB10EXP_SERVICES_DIR/pg" "$GB10EXP_SERVICES_DIR/artifacts"
[ "$(id -u)" = 0 ] && chown postgres "$GB10EXP_SERVICES_DIR/pg"
as_pg "$PG_BIN/initdb" -D "$GB10EXP_SERVICES_DIR/pg/data" -U postgres -A trust >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$GB10EXP_SERVICES_DIR/pg/data" -l "$GB10EXP_SERVICES_DIR/pg/log" -w start \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $GB10EXP_SERVICES_DIR/pg" >/dev/null
as_pg "$PG_BIN/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres \
    -c "CREATE USER mlflow PASSWORD '$PG_PASSWORD'" -c "CREATE DATABASE mlflow OWNER mlflow"
export GB10EXP_TEST_PG_URI="postgresql+psycopg2://mlflow:$PG_PASSWORD@127.0.0.1:$PG_PORT/mlflow"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup .venv/bin/mlflow server --backend-store-uri "$GB10EXP_TEST_PG_URI" \
    --artifacts-destination "$GB10EXP_SERVICES_DIR/artifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 >"$GB10EXP_SERVICES_DIR/mlflow.log" 2>&1 &
echo $! >"$GB10EXP_SERVICES_DIR/mlflow.pid"  # setsid: its pid is also its process group id
export GB10EXP_TEST_MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"
for _ in $(seq 120); do  # the first start creates MLflow's tables in PostgreSQL
    curl -sf "$GB10EXP_TEST_MLFLOW_URI/health" >/dev/null 2>&1 && break
    sleep 1
done
curl -sf "$GB10EXP_TEST_MLFLOW_URI/health" >/dev/null || { tail -20 "$GB10EXP_SERVICES_DIR/mlflow.log"; exit 1; }
echo "services: PostgreSQL on 127.0.0.1:$PG_PORT, MLflow on $GB10EXP_TEST_MLFLOW_URI"

