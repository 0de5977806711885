# shellcheck shell=bash
# The servers the tests marked `server` use, all on loopback:
# - PostgreSQL and an MLflow tracking server (GB10EXP_TEST_MLFLOW_URI, GB10EXP_TEST_PG_URI);
# - an MLflow server with basic-auth (`mlflow server --app-name basic-auth`) in databases of its own
#   (GB10EXP_TEST_MLFLOW_LOGIN_URI, one user: GB10EXP_TEST_MLFLOW_LOGIN_USER / _PASSWORD);
# - a 2-node Ray cluster with token authentication (GB10EXP_TEST_RAY_ADDRESS, token file
#   GB10EXP_TEST_RAY_TOKEN_PATH; nodes started and stopped by .ci/ray_node.sh).
# Sourced by .ci/run (after the venv exists) and by `make test`; stops them all when the calling shell
# exits. By hand: source .ci/services.sh && .venv/bin/python -m pytest -m server
set -euo pipefail

# One folder per checkout: starting, it stops the servers its pid files name, so two checkouts (a CI run beside a
# branch's tests) must not share one. Short: Ray's unix sockets live under it (108-byte limit).
GB10EXP_SERVICES_DIR=${GB10EXP_SERVICES_DIR:-/tmp/gb10exp-services-$(pwd -P | cksum | cut -d' ' -f1)}
PG_PORT=${PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-55000}
MLFLOW_AUTH_PORT=${MLFLOW_AUTH_PORT:-55001}
RAY_PORT=${RAY_PORT:-55379}
RAY_HEAD_IP=127.0.0.2    # not 127.0.0.1: Ray rewrites it to the host's routable IP (.ci/ray_node.sh)
RAY_WORKER_IP=127.0.0.3
PG_PASSWORD=gb10exp-ci-only   # a loopback-only throwaway database
export GB10EXP_SERVICES_DIR   # tests read the server's artifact root under it
services_t0=$SECONDS
VENV=${VENV:-.venv}   # the Makefile's venv
export VENV          # .ci/ray_node.sh starts Ray from it

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")

# PostgreSQL refuses to run as root: run it as the `postgres` user when we are root.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

stop_services() {
    .ci/ray_node.sh stop worker || true
    .ci/ray_node.sh stop head || true
    for server in mlflow mlflow-auth; do
        if [ -f "$GB10EXP_SERVICES_DIR/$server.pid" ]; then
            kill -- "-$(cat "$GB10EXP_SERVICES_DIR/$server.pid")" 2>/dev/null || true  # its whole process group
        fi
    done
    if [ -d "$GB10EXP_SERVICES_DIR/pg/data" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$GB10EXP_SERVICES_DIR/pg/data" -m fast stop >/dev/null 2>&1 || true
    fi
}
stop_services  # this checkout's previous servers, if any
# A port that is still taken belongs to someone else (another checkout's services): say so, touch nothing.
for port in "127.0.0.1 $PG_PORT PG_PORT" "127.0.0.1 $MLFLOW_PORT MLFLOW_PORT" "127.0.0.1 $MLFLOW_AUTH_PORT MLFLOW_AUTH_PORT" \
            "$RAY_HEAD_IP $RAY_PORT RAY_PORT"; do
    set -- $port
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then
        echo "services: $1:$2 is in use by another process: free it or choose another port ($3=...)" >&2
        return 1 2>/dev/null || exit 1
    fi
done
trap stop_services EXIT

rm -rf "$GB10EXP_SERVICES_DIR" && mkdir -p "$GB10EXP_SERVICES_DIR/pg" "$GB10EXP_SERVICES_DIR/artifacts"

# The Ray nodes start in the background (~20 s on 2 cores) while PostgreSQL and MLflow come up.
( .ci/ray_node.sh start head "$RAY_HEAD_IP" "$RAY_PORT" \
    && .ci/ray_node.sh start worker "$RAY_WORKER_IP" "$RAY_HEAD_IP:$RAY_PORT" \
    && echo "services: Ray's 2 nodes up in $((SECONDS - services_t0)) s" ) &
ray_pid=$!
export GB10EXP_TEST_RAY_ADDRESS="$RAY_HEAD_IP:$RAY_PORT"
export GB10EXP_TEST_RAY_TOKEN_PATH="$GB10EXP_SERVICES_DIR/ray/auth_token"

[ "$(id -u)" = 0 ] && chown postgres "$GB10EXP_SERVICES_DIR/pg"
as_pg "$PG_BIN/initdb" -D "$GB10EXP_SERVICES_DIR/pg/data" -U postgres -A trust >/dev/null \
    || { echo "services: initdb failed in $GB10EXP_SERVICES_DIR/pg/data"; exit 1; }
as_pg "$PG_BIN/pg_ctl" -D "$GB10EXP_SERVICES_DIR/pg/data" -l "$GB10EXP_SERVICES_DIR/pg/log" -w start \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $GB10EXP_SERVICES_DIR/pg" >/dev/null \
    || { echo "services: PostgreSQL did not start:"; tail -5 "$GB10EXP_SERVICES_DIR/pg/log"; exit 1; }  # errexit is off under `source ... &&`
# mlflow: the open server's runs; mlflow_auth_runs and mlflow_auth_users: the basic-auth server's runs and
# its users and permissions (apart, so that the open server shows none of the authenticated runs).
as_pg "$PG_BIN/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE USER mlflow PASSWORD '$PG_PASSWORD'" \
    -c "CREATE DATABASE mlflow OWNER mlflow" -c "CREATE DATABASE mlflow_auth_runs OWNER mlflow" \
    -c "CREATE DATABASE mlflow_auth_users OWNER mlflow" \
    || { echo "services: could not create MLflow's databases on 127.0.0.1:$PG_PORT"; exit 1; }
pg_base="postgresql+psycopg2://mlflow:$PG_PASSWORD@127.0.0.1:$PG_PORT"
export GB10EXP_TEST_PG_URI="$pg_base/mlflow"
export GB10EXP_TEST_PG_LOGIN_RUNS_URI="$pg_base/mlflow_auth_runs"
export GB10EXP_TEST_PG_LOGIN_USERS_URI="$pg_base/mlflow_auth_users"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup "$VENV"/bin/mlflow server --backend-store-uri "$GB10EXP_TEST_PG_URI" \
    --artifacts-destination "$GB10EXP_SERVICES_DIR/artifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 >"$GB10EXP_SERVICES_DIR/mlflow.log" 2>&1 &
echo $! >"$GB10EXP_SERVICES_DIR/mlflow.pid"  # setsid: its pid is also its process group id
export GB10EXP_TEST_MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"

# The basic-auth server (MLflow 3.17): a secret key for its forms, an ini naming the users' database, and the
# admin's password on its first start (no default admin password any more; 12 characters at least).
mlflow_admin_password=$("$VENV"/bin/python -c 'import secrets; print(secrets.token_urlsafe(18))')
cat >"$GB10EXP_SERVICES_DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = $GB10EXP_TEST_PG_LOGIN_USERS_URI
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
mkdir -p "$GB10EXP_SERVICES_DIR/artifacts-auth"
MLFLOW_AUTH_CONFIG_PATH="$GB10EXP_SERVICES_DIR/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$mlflow_admin_password" \
MLFLOW_FLASK_SERVER_SECRET_KEY=$("$VENV"/bin/python -c 'import secrets; print(secrets.token_hex(16))') \
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup "$VENV"/bin/mlflow server --app-name basic-auth \
    --backend-store-uri "$GB10EXP_TEST_PG_LOGIN_RUNS_URI" --artifacts-destination "$GB10EXP_SERVICES_DIR/artifacts-auth" \
    --serve-artifacts --host 127.0.0.1 --port "$MLFLOW_AUTH_PORT" --workers 1 \
    >"$GB10EXP_SERVICES_DIR/mlflow-auth.log" 2>&1 &
echo $! >"$GB10EXP_SERVICES_DIR/mlflow-auth.pid"
export GB10EXP_TEST_MLFLOW_LOGIN_URI="http://127.0.0.1:$MLFLOW_AUTH_PORT"

for server in "$GB10EXP_TEST_MLFLOW_URI:mlflow" "$GB10EXP_TEST_MLFLOW_LOGIN_URI:mlflow-auth"; do
    uri=${server%:*} log=$GB10EXP_SERVICES_DIR/${server##*:}.log
    for _ in $(seq 120); do  # the first start creates MLflow's tables in PostgreSQL
        curl -sf "$uri/health" >/dev/null 2>&1 && break
        sleep 1
    done
    curl -sf "$uri/health" >/dev/null || { tail -20 "$log"; exit 1; }
done
# The tests' user: an ordinary one, created by the admin (the admin's password goes no further than here).
export GB10EXP_TEST_MLFLOW_LOGIN_USER=gb10exp-ci
GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD=$("$VENV"/bin/python -c 'import secrets; print("ci-" + secrets.token_urlsafe(18))')
export GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD
curl -sf -u "admin:$mlflow_admin_password" -X POST "$GB10EXP_TEST_MLFLOW_LOGIN_URI/api/2.0/mlflow/users/create" \
    -H 'Content-Type: application/json' \
    -d "{\"username\": \"$GB10EXP_TEST_MLFLOW_LOGIN_USER\", \"password\": \"$GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD\"}" >/dev/null \
    || { echo "could not create the MLflow user"; tail -20 "$GB10EXP_SERVICES_DIR/mlflow-auth.log"; exit 1; }
unset mlflow_admin_password
# The server checks the password against the stored hash at every request. MLflow's (werkzeug's scrypt, 2^15)
# costs 0.3 s of CPU per request on these 2 cores: ~85 CPU-s for the ~280 requests of tests/test_ray.py, in
# a suite that is CPU-bound. The CI user's hash is rewritten with a cheap work factor (PBKDF2, 1,000 rounds):
# the same server, the same checks, for a throwaway password on loopback.
"$VENV"/bin/python - <<'PY' || { echo "could not store the MLflow user's hash"; exit 1; }
import os

import sqlalchemy
from werkzeug.security import generate_password_hash

cheap = generate_password_hash(os.environ["GB10EXP_TEST_MLFLOW_LOGIN_PASSWORD"], method="pbkdf2:sha256:1000")
with sqlalchemy.create_engine(os.environ["GB10EXP_TEST_PG_LOGIN_USERS_URI"]).begin() as db:
    updated = db.execute(sqlalchemy.text("UPDATE users SET password_hash = :h WHERE username = :u"),
                         {"h": cheap, "u": os.environ["GB10EXP_TEST_MLFLOW_LOGIN_USER"]}).rowcount
assert updated == 1, updated
PY

wait "$ray_pid" || { echo "the Ray cluster did not start:"; tail -20 "$GB10EXP_SERVICES_DIR"/ray/*.out; exit 1; }
echo "services: PostgreSQL on 127.0.0.1:$PG_PORT, MLflow on $GB10EXP_TEST_MLFLOW_URI and (basic-auth)" \
    "$GB10EXP_TEST_MLFLOW_LOGIN_URI, Ray head $GB10EXP_TEST_RAY_ADDRESS + node $RAY_WORKER_IP" \
    "(up in $((SECONDS - services_t0)) s)"
