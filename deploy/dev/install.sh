#!/usr/bin/env bash
# Set up this checkout on a fresh Debian or Ubuntu machine with Python 3.11+.
#
#   bash deploy/dev/install.sh          the gateway in .venv (enough for `gateway demo`)
#   bash deploy/dev/install.sh --test   also the test tools, Redis and Mosquitto,
#                                       started on 127.0.0.1 if not already listening,
#                                       and HAProxy for the local topology,
#                                       and Chromium for the browser page's test
#
# It runs apt-get only for what is missing, with sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/../.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

sudo_if_needed() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    sudo_if_needed apt-get update -qq
    apt_updated=1
  fi
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "install.sh: Python 3.11 or newer is needed as '$python' (set PYTHON=...)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$python" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "$with_tests" = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi

# The browser page's MQTT client: the npm package `mqtt`, pinned by
# gateway/web/package-lock.json, whose browser bundle the gateway serves.
command -v npm >/dev/null || apt_install nodejs npm
(cd gateway/web && npm ci --omit=dev --no-audit --no-fund --loglevel=error)

[ "$with_tests" = 1 ] || exit 0

# The browser page's end-to-end test drives Debian's Chromium through Playwright
# (installed above with the test extras; it downloads no browser of its own).
command -v chromium >/dev/null || apt_install chromium

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

command -v redis-server >/dev/null || apt_install redis-server
if ! listening 6379; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
command -v mosquitto >/dev/null || apt_install mosquitto
# The load balancer of the local topology (deploy/local/topology.sh), which
# starts its own instance; the package's service is not needed.
command -v haproxy >/dev/null || apt_install haproxy
if ! listening 1883; then
  mosquitto -d -p 1883
fi
for port in 6379 1883; do
  for _ in $(seq 50); do listening "$port" && break; sleep 0.1; done
  listening "$port" || { echo "install.sh: nothing listens on $port" >&2; exit 1; }
done
