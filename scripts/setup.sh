#!/usr/bin/env bash
# Installs what secondlook needs on a Debian/Ubuntu machine: mosquitto's clients when
# missing, a virtual environment in .venv, torch, and the project with its test tools.
#   ./scripts/setup.sh                # a gateway: the daemon uses the site's broker
#   ./scripts/setup.sh --with-broker  # also Debian's mosquitto broker (the tests and the demo
#                                     #   run one), which Debian starts on 127.0.0.1:1883
# TORCH_SPEC picks the torch build (default: torch==2.13.0; pip arguments, so that e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" takes the CPU
# build on a machine without a GPU, where PyPI's default is the CUDA one of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

python3 - <<'PY' || { echo "secondlook needs Python >= 3.11" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 11))
PY

with_broker=no
case "${1:-}" in
    --with-broker) with_broker=yes ;;
    "") ;;
    *) echo "usage: $0 [--with-broker]" >&2; exit 2 ;;
esac

missing=()
if [ "$with_broker" = yes ]; then
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
fi
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
python3 -c "import ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# a venv without pip (made before python3-venv was installed) is made again
.venv/bin/python -m pip --version >/dev/null 2>&1 || python3 -m venv --clear .venv
# the systemd unit (ProtectHome=yes) sees neither /root nor /home: a venv whose interpreter
# lies there (pyenv's, say) cannot start under it
interpreter=$(realpath .venv/bin/python)
case "$interpreter" in
    /root/* | /home/*)
        case "$PWD" in
            /root/* | /home/*) ;;
            *) echo "warning: .venv runs $interpreter, which the systemd unit cannot see" \
                "(ProtectHome=yes); for the service, make it with a system python3:" \
                "rm -r $PWD/.venv && PATH=/usr/bin:\$PATH $PWD/scripts/setup.sh $*" \
                "(with the same TORCH_SPEC)" >&2 ;;
        esac ;;
esac
.venv/bin/python -m pip install -q --upgrade pip
# torch before the project, so that the project's own `torch` requirement is already met
# shellcheck disable=SC2086 # TORCH_SPEC holds pip arguments
.venv/bin/python -c "import torch" >/dev/null 2>&1 || .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[test]"
echo "secondlook installed in .venv"
