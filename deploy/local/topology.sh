#!/usr/bin/env bash
# The deployment topology on one machine, without containers: two gateway replicas
# behind HAProxy and a job worker (`gateway worker`), sharing a Redis, publishing to
# a Mosquitto that runs the configuration and ACL of deploy/mosquitto/. As in
# deploy/compose.yaml the replicas run no jobs: the worker runs every job that
# POST /jobs queues. Everything listens on 127.0.0.1 and keeps its files, logs
# (one NAME.log per process) and pid files in one run directory.
#
#   bash deploy/local/topology.sh start    start everything, wait until it is ready;
#                                          refuses when one of its ports is taken,
#                                          and stops what it started if any part
#                                          fails to start
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
#   TOPOLOGY_WORKER_JOBS  jobs the worker runs at once [4]
#   TOPOLOGY_VIEWER_PASSWORD   password of the broker user "viewer" [viewer-pass]
#   GATEWAY_API_KEY       the replicas' key, also the broker password of the user
#                         "gateway" [a random one, written to the run directory]
#   GATEWAY_*             any other gateway setting is passed to both replicas and
#                         the worker
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
worker_jobs=${TOPOLOGY_WORKER_JOBS:-4}
viewer_password=${TOPOLOGY_VIEWER_PASSWORD:-viewer-pass}
python=${TOPOLOGY_PYTHON:-$root/.venv/bin/python}
# Started in this order, stopped in the reverse one: the worker needs only Redis
# and the broker, HAProxy comes last so that clients find the replicas ready.
components=(redis mosquitto worker g1 g2 haproxy)

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

port_free() {
  # port_free PORT VARIABLE: refuse a port that something already listens on.
  # Started anyway, our process would fail to listen and exit, while the check
  # that the port listens would pass for the other one.
  if listening "$1"; then
    say "port $1 is taken: something already listens on 127.0.0.1:$1;" \
      "stop it or choose another port with $2"
    return 1
  fi
}

ports_free() {
  # Every port, before anything starts, so that a taken one costs no start and
  # stop of the others.
  port_free "$redis_port" TOPOLOGY_REDIS_PORT
  port_free "$mqtt_port" TOPOLOGY_MQTT_PORT
  port_free "$mqtt_ws_port" TOPOLOGY_MQTT_WS_PORT
  port_free "$g1_port" TOPOLOGY_G1_PORT
  port_free "$g2_port" TOPOLOGY_G2_PORT
  port_free "$lb_port" TOPOLOGY_LB_PORT
}

launch() {
  # launch NAME COMMAND...: run COMMAND in the background, its output in
  # NAME.log and its pid in NAME.pid. Every program runs in its foreground mode,
  # so that the pid is known at once and an exit at start is seen at once.
  local name=$1
  shift
  nohup "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

started() {
  # started NAME SECONDS DESCRIPTION COMMAND...: retry COMMAND ten times a second
  # until it succeeds while NAME's process lives; fail at once if it exits.
  local name=$1 seconds=$2 what=$3
  shift 3
  for _ in $(seq $((seconds * 10))); do
    if ! alive "$name"; then
      say "$name exited while starting; the end of $dir/$name.log:"
      tail -n 5 "$dir/$name.log" 2>/dev/null | sed 's/^/  /' >&2 || true
      return 1
    fi
    "$@" && alive "$name" && return 0
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
  port_free "$redis_port" TOPOLOGY_REDIS_PORT
  launch redis redis-server --bind 127.0.0.1 --port "$redis_port" --save "" \
    --appendonly no --daemonize no --dir "$dir"
  started redis 10 "redis on $redis_port" listening "$redis_port"
}

start_mosquitto() {
  local key=$1 conf=$dir/mosquitto.conf
  port_free "$mqtt_port" TOPOLOGY_MQTT_PORT
  port_free "$mqtt_ws_port" TOPOLOGY_MQTT_WS_PORT
  mkdir -p "$dir/mosquitto-data"
  rm -f "$dir/passwd"
  mosquitto_passwd -c -b "$dir/passwd" gateway "$key"
  mosquitto_passwd -b "$dir/passwd" viewer "$viewer_password"
  chmod 600 "$dir/passwd"
  # The shipped configuration, its listeners and paths moved into the run
  # directory; its logging goes to standard error, unbuffered, which launch
  # keeps in mosquitto.log.
  sed -e "s|^listener 1883$|listener $mqtt_port 127.0.0.1|" \
    -e "s|^listener 9001$|listener $mqtt_ws_port 127.0.0.1|" \
    -e "s|^password_file .*|password_file $dir/passwd|" \
    -e "s|^acl_file .*|acl_file $root/deploy/mosquitto/acl|" \
    -e "s|^persistence_location .*|persistence_location $dir/mosquitto-data/|" \
    -e "/^log_dest /d" \
    "$root/deploy/mosquitto/mosquitto.conf" >"$conf"
  {
    echo "log_dest stderr"
    # As root Mosquitto would switch to the user "mosquitto", who cannot read
    # the run directory; as anyone else it ignores this line.
    echo "user $(id -un)"
  } >>"$conf"
  launch mosquitto mosquitto -c "$conf"
  started mosquitto 10 "mosquitto on $mqtt_port" listening "$mqtt_port"
}

launch_worker() {
  local key=$1
  # As deploy/compose.yaml runs it: the replicas' Redis, and jobs run here only.
  # It also gets the broker, so that job events reach MQTT subscribers the way
  # the events the replicas take do.
  launch worker env GATEWAY_REPLICA=worker GATEWAY_API_KEY="$key" \
    GATEWAY_REDIS_URL="redis://127.0.0.1:$redis_port/0" \
    GATEWAY_MQTT_URL="mqtt://gateway:$key@127.0.0.1:$mqtt_port" \
    GATEWAY_JOB_WORKERS="$worker_jobs" \
    "$python" -m gateway worker
}

worker_started() {
  case ${GATEWAY_LOG_LEVEL:-info} in
    debug | info | DEBUG | INFO)
      started worker 20 "the job worker" \
        grep -q "job worker pool .* started" "$dir/worker.log"
      ;;
    *)
      # Its start line is not logged at this level: alive a moment after its
      # start is all there is to check.
      sleep 2
      started worker 1 "the job worker" true
      ;;
  esac
}

launch_gateway() {
  local name=$1 port=$2 key=$3
  port_free "$port" "TOPOLOGY_${name^^}_PORT"
  launch "$name" env GATEWAY_REPLICA="$name" GATEWAY_HOST=127.0.0.1 \
    GATEWAY_PORT="$port" GATEWAY_API_KEY="$key" \
    GATEWAY_REDIS_URL="redis://127.0.0.1:$redis_port/0" \
    GATEWAY_MQTT_URL="mqtt://gateway:$key@127.0.0.1:$mqtt_port" \
    GATEWAY_JOB_WORKERS="${GATEWAY_JOB_WORKERS:-0}" \
    "$python" -m gateway serve
}

start_haproxy() {
  port_free "$lb_port" TOPOLOGY_LB_PORT
  # The same front end as deploy/haproxy.cfg, its servers on loopback.
  sed -e "s|^    bind :8080$|    bind 127.0.0.1:$lb_port|" \
    -e "s|gateway-1:8000|127.0.0.1:$g1_port|" \
    -e "s|gateway-2:8000|127.0.0.1:$g2_port|" \
    "$root/deploy/haproxy.cfg" >"$dir/haproxy.cfg"
  grep -q "bind 127.0.0.1:$lb_port" "$dir/haproxy.cfg" \
    || { say "deploy/haproxy.cfg has no 'bind :8080' line"; return 1; }
  # -db: in the foreground, logging to standard output (the configuration's
  # "log stdout"), which launch keeps.
  launch haproxy haproxy -db -f "$dir/haproxy.cfg"
  started haproxy 10 "haproxy on $lb_port" listening "$lb_port"
}

stop_on_failure() {
  # The EXIT trap of start: after a failure, stop what was started.
  local status=$?
  if [ "$status" -ne 0 ]; then
    say "start failed; stopping what it started"
    stop
  fi
  exit "$status"
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
    # Left by a process that died: it would be taken for the new one's.
    rm -f "$dir/$name.pid"
  done
  ports_free
  local key
  key=$(api_key)
  trap stop_on_failure EXIT
  start_redis
  start_mosquitto "$key"
  # Three Python processes start at once: their imports overlap.
  launch_worker "$key"
  launch_gateway g1 "$g1_port" "$key"
  launch_gateway g2 "$g2_port" "$key"
  worker_started
  started g1 20 "g1 ready on $g1_port" ready "$g1_port"
  started g2 20 "g2 ready on $g2_port" ready "$g2_port"
  start_haproxy
  started haproxy 10 "the load balancer ready on $lb_port" ready "$lb_port"
  trap - EXIT
  status
}

stop() {
  local index name pid
  for ((index = ${#components[@]} - 1; index >= 0; index--)); do
    name=${components[index]}
    alive "$name" || { rm -f "$dir/$name.pid"; continue; }
    pid=$(cat "$dir/$name.pid")
    kill -TERM "$pid"
    # A gateway drains for drain_delay + shutdown_timeout at most (9 s); the
    # worker lets running jobs finish for half of shutdown_timeout.
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
  echo "replicas: http://127.0.0.1:$g1_port http://127.0.0.1:$g2_port;" \
    "jobs run by the worker, $worker_jobs at once"
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
