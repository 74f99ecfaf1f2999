#!/usr/bin/env bash
# Install Debian packages with apt-get (needs root): what the container, cluster and playground tests install
# when a package they need is missing (scripts/docker_env.sh's install_missing, `make playground-test`).
#
#   scripts/apt_install.sh PACKAGE...
#
# It first finishes any dpkg run that was cut off (`dpkg --configure -a`): a machine where an earlier install
# was killed half-way (a CI job stopped mid-`apt-get install`) otherwise refuses every later install with
# "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem", and that is
# exactly the command apt asks for. On a healthy machine it does nothing.
set -euo pipefail

[ $# -gt 0 ] || {
    echo "usage: scripts/apt_install.sh PACKAGE..." >&2
    exit 2
}
if [ "$(id -u)" != 0 ]; then
    echo "error: $* missing, and installing them needs root: sudo apt-get install $*" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
dpkg --configure -a
apt-get update -q
apt-get install -y -q "$@"
