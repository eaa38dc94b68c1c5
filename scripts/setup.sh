#!/usr/bin/env bash
# Set up lrlightning in ./.venv (idempotent): Fashion-MNIST from Debian when root, the CPU torch build, the package.
# TORCH_SPEC overrides the torch requirement (default "torch==2.13.0"); EXTRAS the extras (default "dev").
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS:-dev}]"
