#!/usr/bin/env bash
# Installs MIGlet on a VM image: the binary, a runner user, the systemd unit and an env file.
# Usage: sudo deploy/install.sh path/to/miglet [--runner-dir /opt/actions-runner]
# Run it while baking the image; the runner itself is installed separately (or downloaded by
# the agent from MIGLET_RUNNER_DOWNLOAD_URL, verified against MIGLET_RUNNER_SHA256).
set -euo pipefail

BIN=${1:?usage: install.sh path/to/miglet [--runner-dir DIR]}
shift
RUNNER_DIR=/opt/actions-runner
while [ $# -gt 0 ]; do
    case "$1" in
        --runner-dir) RUNNER_DIR=${2:?}; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh must run as root" >&2
    exit 1
fi

install -m 0755 "$BIN" /usr/local/bin/miglet
if ! id runner >/dev/null 2>&1; then
    useradd --system --create-home --shell /bin/bash runner
fi
install -d -m 0755 "$RUNNER_DIR"
chown -R runner: "$RUNNER_DIR"
install -d -m 0750 /etc/miglet
if [ ! -f /etc/miglet/miglet.env ]; then
    install -m 0640 "$HERE/miglet.env.example" /etc/miglet/miglet.env
    sed -i "s|^MIGLET_RUNNER_DIR=.*|MIGLET_RUNNER_DIR=$RUNNER_DIR|" /etc/miglet/miglet.env
fi
install -m 0644 "$HERE/miglet.service" /etc/systemd/system/miglet.service
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable miglet.service
fi
echo "MIGlet installed. Edit /etc/miglet/miglet.env, then: systemctl start miglet"
