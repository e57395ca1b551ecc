#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine: one head and N worker nodes, each
# its own raylet with its own resources and temp dir, token authentication on, the
# Jobs API on 127.0.0.1.  For trying `curate submit` and the multi-node tests.
#
#   infra/local_cluster.sh start [N]   head + N workers (default 2); prints the addresses
#   infra/local_cluster.sh status      `ray status` of this cluster
#   infra/local_cluster.sh env         the exports a shell needs to talk to it
#   infra/local_cluster.sh stop        stop this cluster's nodes (and only them)
#
# Settings (environment): CURATE_CLUSTER_DIR (state, temp dirs, token; default
# /tmp/curate-cluster), RAY (default: the repo's .venv/bin/ray), GCS_PORT (6390),
# DASHBOARD_PORT (8275), CLIENT_PORT (20011: outside Ray's worker ports 10002-19999),
# AGENT_PORT (52400; worker i gets +i: nodes on one host must not share it),
# HEAD_CPUS (0: the head runs drivers, workers run tasks), WORKER_CPUS (1),
# OBJECT_STORE_MB (512 per node), START_TIMEOUT (120 s).  Workers carry the custom
# resources worker_node and cpu_node (as many as their CPUs), the head head_node.
#
# Every node is a `ray start --block` process started in its own process group;
# `stop` signals exactly those groups.  `ray stop` is never used: it stops every
# Ray on the machine, including ones this script did not start.
#
# Network: the dashboard and Jobs API bind 127.0.0.1 only.  Ray turns a node IP of
# 127.0.0.1 into this host's own address (services.resolve_ip_for_localhost), so
# the nodes reach each other at that address; packets to one's own address never
# leave the machine.  Ray's gRPC servers (GCS, raylets, object managers) listen on
# all interfaces and Ray has no option to narrow that: token authentication is
# what guards them, so keep it on, and firewall the host if it is reachable.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dir=${CURATE_CLUSTER_DIR:-/tmp/curate-cluster}
ray=${RAY:-$repo/.venv/bin/ray}
gcs_port=${GCS_PORT:-6390}
dashboard_port=${DASHBOARD_PORT:-8275}
client_port=${CLIENT_PORT:-20011}
agent_port=${AGENT_PORT:-52400}
head_cpus=${HEAD_CPUS:-0}
worker_cpus=${WORKER_CPUS:-1}
store_bytes=$(( ${OBJECT_STORE_MB:-512} * 1024 * 1024 ))
timeout=${START_TIMEOUT:-120}
ip=127.0.0.1

die() { echo "local_cluster: $*" >&2; exit 1; }

# Job entry points run `python` (curate.cluster.entrypoint): make it the venv's.
venv_env() {
  local bin
  bin=$(cd "$(dirname "$ray")" && pwd)
  export PATH="$bin:$PATH"
  export VIRTUAL_ENV=$(dirname "$bin")
}

auth_env() {
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$dir/auth_token"
  unset RAY_AUTH_TOKEN
}

# Start one node in its own process group; remember the group id.
launch() {
  local name=$1; shift
  mkdir -p "$dir/$name"
  setsid "$ray" start --block --disable-usage-stats --node-ip-address "$ip" \
    --temp-dir "$dir/$name" --object-store-memory "$store_bytes" "$@" \
    >"$dir/$name.log" 2>&1 < /dev/null &
  echo "$!" > "$dir/$name.pid"
}

# Fail fast (after stopping what was started) when a node process has exited.
check_running() {
  local name=$1
  if ! kill -0 "$(<"$dir/$name.pid")" 2>/dev/null; then
    tail -n 15 "$dir/$name.log" >&2
    stop >&2
    die "node '$name' exited while starting (log above: $dir/$name.log)"
  fi
}

alive_nodes() {
  "$ray" status --address "$ip:$gcs_port" 2>/dev/null | grep -c '^ [0-9]* node_' || true
}

start() {
  local workers=${1:-2}
  [[ $workers =~ ^[0-9]+$ ]] || die "worker count must be a number, got '$workers'"
  [[ -x $ray ]] || die "no ray at $ray (run 'make setup' or set RAY=)"
  if compgen -G "$dir/*.pid" > /dev/null; then
    die "$dir holds a running cluster's pids; run '$0 stop' first"
  fi
  mkdir -p "$dir"
  chmod 700 "$dir"
  if [[ ! -s $dir/auth_token ]]; then
    (umask 077; "$(dirname "$ray")/python" -c 'import secrets; print(secrets.token_hex(32))' \
      > "$dir/auth_token")
  fi
  auth_env
  venv_env

  launch head --head --port "$gcs_port" --dashboard-host "$ip" \
    --dashboard-port "$dashboard_port" --ray-client-server-port "$client_port" \
    --dashboard-agent-listen-port "$agent_port" --num-cpus "$head_cpus" \
    --resources '{"head_node": 1}'

  local deadline=$((SECONDS + timeout))
  until [[ $(alive_nodes) -ge 1 ]]; do
    check_running head
    (( SECONDS < deadline )) || { stop >&2; die "head not up after ${timeout}s"; }
    sleep 1
  done

  local i
  for ((i = 1; i <= workers; i++)); do
    launch "worker$i" --address "$ip:$gcs_port" --num-cpus "$worker_cpus" \
      --dashboard-agent-listen-port $((agent_port + i)) \
      --resources "{\"worker_node\": $worker_cpus, \"cpu_node\": $worker_cpus}"
  done
  until [[ $(alive_nodes) -ge $((workers + 1)) ]]; do
    for ((i = 1; i <= workers; i++)); do check_running "worker$i"; done
    (( SECONDS < deadline )) || { stop >&2; die "only $(alive_nodes) node(s) up after ${timeout}s"; }
    sleep 1
  done

  echo "ray cluster: 1 head + $workers worker node(s) on this machine"
  echo "  GCS (ray.init / --address): $ip:$gcs_port"
  echo "  dashboard and Jobs API:     http://$ip:$dashboard_port"
  echo "  token:                      $dir/auth_token"
  echo "  talk to it:                 eval \"\$($0 env)\""
}

env_lines() {
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$dir/auth_token"
  echo "export RAY_ADDRESS=http://$ip:$dashboard_port"
  echo "# RAY_ADDRESS is the Jobs API (ray job, curate submit); a driver on this machine"
  echo "# joins with: curate run ... --address $ip:$gcs_port"
}

status() {
  auth_env
  "$ray" status --address "$ip:$gcs_port"
}

stop() {
  local f pid stopped=0
  shopt -s nullglob
  # Workers first, then the head.
  for f in "$dir"/worker*.pid "$dir"/head.pid; do
    pid=$(<"$f")
    if kill -0 -- "-$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      stopped=$((stopped + 1))
    fi
  done
  for f in "$dir"/worker*.pid "$dir"/head.pid; do
    pid=$(<"$f")
    for _ in $(seq 1 30); do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  echo "stopped $stopped node(s)"
}

case ${1:-} in
  start) start "${2:-2}" ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 start [N] | status | env | stop" >&2; exit 2 ;;
esac
