# Shared by scripts/demo and scripts/test: a virtualenv with the project, and the local services.
# Sourced, not run.  Idempotent: does nothing that is already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_venv() {
  local stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ]; then
    say "installing conference-worker and its development tools"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c 'import worker, faststream, aio_pika, httpx, redis, aiohttp' # fail loudly if the install failed
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

port_open() { timeout 1 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then say "please install: $*"; return 1; fi
  say "installing Debian packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 120); do port_open "$port" && return 0; sleep 0.5; done
  say "$what did not come up on 127.0.0.1:$port"; return 1
}

ensure_rabbitmq() {
  if ! port_open 5672; then
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    say "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_port 5672 RabbitMQ
    # The broker accepts TCP before it is ready for AMQP; wait until it answers.
    rabbitmqctl await_startup >/dev/null 2>&1 || true
  fi
  ensure_rabbitmq_plugin rabbitmq_consistent_hash_exchange
}

# The partitioned topology's consistent-hash exchange is a plugin shipped with RabbitMQ (README,
# "Scaling").  Enabling an enabled plugin is a no-op; a broker we cannot administer is reported.
ensure_rabbitmq_plugin() {
  local plugin=$1
  command -v rabbitmq-plugins >/dev/null || { say "no rabbitmq-plugins here: enable $plugin on the broker"; return 0; }
  if rabbitmq-plugins list -e "^$plugin\$" 2>/dev/null | grep -q "\[E"; then return 0; fi
  say "enabling the RabbitMQ plugin $plugin"
  rabbitmq-plugins enable "$plugin" >/dev/null 2>&1 \
    || say "could not enable $plugin (run: rabbitmq-plugins enable $plugin, or set CW_PARTITIONS=0)"
}

# Headless Chromium and its driver, for the dead-letter console's browser test.
ensure_chromium() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
  apt_install chromium chromium-driver || say "no chromium: the console's browser test will be skipped"
}

ensure_redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null
  wait_port 6379 Redis
}
