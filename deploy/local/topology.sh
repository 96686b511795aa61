#!/usr/bin/env bash
# The deployment topology on one machine, without containers: two gateway replicas
# behind HAProxy, sharing a Redis, publishing to a Mosquitto that runs the
# configuration and ACL of deploy/mosquitto/. Everything listens on 127.0.0.1 and
# keeps its files, logs and pid files in one run directory.
#
#   bash deploy/local/topology.sh start    start everything, wait until it is ready
#   bash deploy/local/topology.sh stop     SIGTERM everything it started, in reverse
#   bash deploy/local/topology.sh status   what runs, with pids and addresses
#
# Settings, from the environment (defaults in brackets):
#   TOPOLOGY_DIR          run directory [.topology in the checkout]
#   TOPOLOGY_LB_PORT      HAProxy, where clients and producers connect [8080]
#   TOPOLOGY_G1_PORT      first gateway replica [8001]
#   TOPOLOGY_G2_PORT      second gateway replica [8002]
#   TOPOLOGY_REDIS_PORT   Redis, a private instance keeping nothing on disk [6390]
#   TOPOLOGY_MQTT_PORT    Mosquitto, MQTT [1884]
#   TOPOLOGY_MQTT_WS_PORT Mosquitto, MQTT over WebSocket [9002]
#   TOPOLOGY_VIEWER_PASSWORD   password of the broker user "viewer" [viewer-pass]
#   GATEWAY_API_KEY       the replicas' key, also the broker password of the user
#                         "gateway" [a random one, written to the run directory]
#   GATEWAY_*             any other gateway setting is passed to both replicas
#
# Needs redis-server, mosquitto (with mosquitto_passwd) and haproxy on the PATH
# (bash deploy/dev/install.sh --test installs them) and the gateway in .venv.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${TOPOLOGY_DIR:-$root/.topology}
lb_port=${TOPOLOGY_LB_PORT:-8080}
g1_port=${TOPOLOGY_G1_PORT:-8001}
g2_port=${TOPOLOGY_G2_PORT:-8002}
redis_port=${TOPOLOGY_REDIS_PORT:-6390}
mqtt_port=${TOPOLOGY_MQTT_PORT:-1884}
mqtt_ws_port=${TOPOLOGY_MQTT_WS_PORT:-9002}
viewer_password=${TOPOLOGY_VIEWER_PASSWORD:-viewer-pass}
python=${TOPOLOGY_PYTHON:-$root/.venv/bin/python}
# Started in this order, stopped in the reverse one.
components=(redis mosquitto g1 g2 haproxy)

say() { echo "topology: $*" >&2; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() {
  # A process that has exited but not been reaped yet (a zombie) counts as gone.
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

alive() {
  local pid
  [ -f "$dir/$1.pid" ] && pid=$(cat "$dir/$1.pid") && [ -n "$pid" ] \
    && running "$pid"
}

wait_for() {
  # wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND ten times a second.
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 10))); do
    "$@" && return 0
    sleep 0.1
  done
  say "$what not within $seconds s; logs are in $dir"
  return 1
}

ready() {
  "$python" -c 'import sys, urllib.request
try:
    sys.exit(urllib.request.urlopen(sys.argv[1], timeout=1).status != 200)
except OSError:
    sys.exit(1)' "http://127.0.0.1:$1/readyz"
}

api_key() {
  if [ -n "${GATEWAY_API_KEY:-}" ]; then
    echo "$GATEWAY_API_KEY"
  elif [ -f "$dir/api-key" ]; then
    cat "$dir/api-key"
  else
    "$python" -c 'import secrets; print(secrets.token_urlsafe(24))' \
      | tee "$dir/api-key"
  fi
}

start_redis() {
  redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --dir "$dir"
  wait_for 10 "redis on $redis_port" listening "$redis_port"
}

start_mosquitto() {
  local key=$1 conf=$dir/mosquitto.conf
  mkdir -p "$dir/mosquitto-data"
  rm -f "$dir/passwd"
  mosquitto_passwd -c -b "$dir/passwd" gateway "$key"
  mosquitto_passwd -b "$dir/passwd" viewer "$viewer_password"
  chmod 600 "$dir/passwd"
  # The shipped configuration, its listeners and paths moved into the run
  # directory; its logging goes to a file instead of stdout.
  sed -e "s|^listener 1883$|listener $mqtt_port 127.0.0.1|" \
    -e "s|^listener 9001$|listener $mqtt_ws_port 127.0.0.1|" \
    -e "s|^password_file .*|password_file $dir/passwd|" \
    -e "s|^acl_file .*|acl_file $root/deploy/mosquitto/acl|" \
    -e "s|^persistence_location .*|persistence_location $dir/mosquitto-data/|" \
    -e "/^log_dest /d" \
    "$root/deploy/mosquitto/mosquitto.conf" >"$conf"
  {
    echo "log_dest file $dir/mosquitto.log"
    echo "pid_file $dir/mosquitto.pid"
    # As root Mosquitto would switch to the user "mosquitto", who cannot read
    # the run directory; as anyone else it ignores this line.
    echo "user $(id -un)"
  } >>"$conf"
  mosquitto -c "$conf" -d
  wait_for 10 "mosquitto on $mqtt_port" listening "$mqtt_port"
}

start_gateway() {
  local name=$1 port=$2 key=$3
  GATEWAY_REPLICA=$name GATEWAY_HOST=127.0.0.1 GATEWAY_PORT=$port \
    GATEWAY_API_KEY=$key \
    GATEWAY_REDIS_URL=redis://127.0.0.1:$redis_port/0 \
    GATEWAY_MQTT_URL=mqtt://gateway:$key@127.0.0.1:$mqtt_port \
    GATEWAY_JOB_WORKERS=${GATEWAY_JOB_WORKERS:-0} \
    nohup "$python" -m gateway serve >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

start_haproxy() {
  # The same front end as deploy/haproxy.cfg, its servers on loopback.
  sed -e "s|^    bind :8080$|    bind 127.0.0.1:$lb_port|" \
    -e "s|gateway-1:8000|127.0.0.1:$g1_port|" \
    -e "s|gateway-2:8000|127.0.0.1:$g2_port|" \
    "$root/deploy/haproxy.cfg" >"$dir/haproxy.cfg"
  grep -q "bind 127.0.0.1:$lb_port" "$dir/haproxy.cfg" \
    || { say "deploy/haproxy.cfg has no 'bind :8080' line"; return 1; }
  haproxy -q -D -f "$dir/haproxy.cfg" -p "$dir/haproxy.pid"
  wait_for 10 "haproxy on $lb_port" listening "$lb_port"
}

start() {
  for command in redis-server mosquitto mosquitto_passwd haproxy; do
    command -v "$command" >/dev/null \
      || { say "$command is missing: bash deploy/dev/install.sh --test"; exit 1; }
  done
  mkdir -p "$dir"
  for name in "${components[@]}"; do
    if alive "$name"; then
      say "$name already runs (pid $(cat "$dir/$name.pid")); stop first"
      exit 1
    fi
  done
  local key
  key=$(api_key)
  start_redis
  start_mosquitto "$key"
  start_gateway g1 "$g1_port" "$key"
  start_gateway g2 "$g2_port" "$key"
  wait_for 20 "g1 ready on $g1_port" ready "$g1_port"
  wait_for 20 "g2 ready on $g2_port" ready "$g2_port"
  start_haproxy
  wait_for 10 "the load balancer ready on $lb_port" ready "$lb_port"
  status
}

stop() {
  local index name pid
  for ((index = ${#components[@]} - 1; index >= 0; index--)); do
    name=${components[index]}
    alive "$name" || { rm -f "$dir/$name.pid"; continue; }
    pid=$(cat "$dir/$name.pid")
    kill -TERM "$pid"
    # A gateway drains for drain_delay + shutdown_timeout at most (9 s).
    for _ in $(seq 150); do running "$pid" || break; sleep 0.1; done
    if running "$pid"; then
      say "$name (pid $pid) ignored SIGTERM for 15 s: killing it"
      kill -KILL "$pid"
    fi
    rm -f "$dir/$name.pid"
  done
}

status() {
  local name state
  for name in "${components[@]}"; do
    if alive "$name"; then state="pid $(cat "$dir/$name.pid")"; else state=stopped; fi
    echo "$name: $state"
  done
  echo "clients and producers: http://127.0.0.1:$lb_port (ws://127.0.0.1:$lb_port/ws)"
  echo "replicas: http://127.0.0.1:$g1_port http://127.0.0.1:$g2_port"
  echo "mqtt: mqtt://127.0.0.1:$mqtt_port ws://127.0.0.1:$mqtt_ws_port" \
    "(users gateway and viewer)"
  echo "redis: redis://127.0.0.1:$redis_port/0; run directory: $dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
