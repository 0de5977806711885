#!/usr/bin/env bash
# One node of the Ray cluster on loopback that the tests marked `server` use (.ci/services.sh starts two):
#   .ci/ray_node.sh start head   NODE_IP PORT           the head, its GCS on NODE_IP:PORT
#   .ci/ray_node.sh start NAME   NODE_IP HEAD_IP:PORT   another node joining it
#   .ci/ray_node.sh stop  NAME [KILL]                   stop it (KILL: SIGKILL all of it at once, a machine dying)
# Each node gets its own 127.x address: Ray rewrites 127.0.0.1 (and localhost) to the host's routable IP, any
# other 127.x.y.z is kept. Token authentication is on; the token file is $GB10EXP_RAY_DIR/auth_token, never
# ~/.ray. Each node runs in its own session (setsid), whose id is saved in $GB10EXP_RAY_DIR/NAME.sid: stop
# signals exactly that node's processes (`ray stop` would end every Ray process of the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
# Short: Ray's unix sockets live under it (108-byte limit).
GB10EXP_RAY_DIR=${GB10EXP_RAY_DIR:-${GB10EXP_SERVICES_DIR:?source .ci/services.sh, which sets it}/ray}
VENV=${VENV:-.venv}
action=$1 name=$2
sid_file=$GB10EXP_RAY_DIR/$name.sid

start() {
    local ip=$1 where=$2 args
    [ -e "$sid_file" ] && { echo "ray node $name already started ($sid_file)" >&2; exit 1; }
    mkdir -p "$GB10EXP_RAY_DIR/$name"
    if [ ! -s "$GB10EXP_RAY_DIR/auth_token" ]; then  # the format of `ray get-auth-token --generate`
        (umask 077; "$VENV"/bin/python -c 'import secrets; print(secrets.token_hex(32), end="")' \
            >"$GB10EXP_RAY_DIR/auth_token")
    fi
    if [ "$name" = head ]; then
        # A node that stops answering is declared dead after ~3 s instead of ~13 s (the lost-node test waits on it).
        args=(--head --port="$where" --include-dashboard=false)
        health=(RAY_health_check_initial_delay_ms=1000 RAY_health_check_period_ms=1000
                RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=3)
    else
        args=(--address="$where")
        health=()
    fi
    # A bare environment: nothing of the CI's (passwords of the test servers included) reaches the jobs
    # except what the launcher forwards, and PYTHONPATH, so that the nodes import the driver's gb10exp.
    # 1 CPU per node: two jobs at once land on two nodes.
    setsid env -i PATH="$PATH" HOME="$HOME" LANG=C.UTF-8 ${PYTHONPATH:+PYTHONPATH="$PYTHONPATH"} RAY_AUTH_MODE=token \
        RAY_AUTH_TOKEN_PATH="$GB10EXP_RAY_DIR/auth_token" RAY_USAGE_STATS_ENABLED=0 "${health[@]}" \
        bash -c 'echo $$ >"$0"; exec "$@"' "$sid_file" "$VENV"/bin/ray start "${args[@]}" \
        --node-ip-address="$ip" --temp-dir="$GB10EXP_RAY_DIR/$name" --num-cpus=1 --num-gpus=0 \
        --object-store-memory=100000000 --disable-usage-stats --log-style=record \
        >"$GB10EXP_RAY_DIR/$name.out" 2>&1 </dev/null \
        || { rm -f "$sid_file"; cat "$GB10EXP_RAY_DIR/$name.out" >&2; exit 1; }
}

alive() {  # session id, then raylet | gcs_server | rest: that session's live pids
    ps -eo pid=,sid=,stat=,comm= | awk -v s="$1" -v w="$2" '$2 == s && $3 !~ /^Z/ {
        if (w == "raylet" ? $4 == "raylet" : w == "gcs_server" ? $4 == "gcs_server" : ($4 != "raylet" && $4 != "gcs_server")) print $1 }'
}

stop() {  # `ray stop`'s order: raylet, the rest, gcs_server; each SIGTERM, then SIGKILL after 5 s
    [ -s "$sid_file" ] || return 0
    local sid pids
    sid=$(cat "$sid_file")
    for which in raylet rest gcs_server; do
        pids=$(alive "$sid" $which)
        [ -z "$pids" ] && continue
        if [ "${1:-}" = KILL ]; then kill -KILL $pids 2>/dev/null || true; continue; fi
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 25); do [ -z "$(alive "$sid" $which)" ] && break; sleep 0.2; done
        pids=$(alive "$sid" $which)
        [ -n "$pids" ] && { kill -KILL $pids 2>/dev/null || true; }
    done
    rm -f "$sid_file"
}

case $action in
    start) start "$3" "$4" ;;
    stop) stop "${3:-}" ;;
    *) echo "usage: $0 start NAME NODE_IP PORT|HEAD_IP:PORT | stop NAME [KILL]" >&2; exit 2 ;;
esac
