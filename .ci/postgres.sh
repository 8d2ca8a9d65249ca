#!/usr/bin/env bash
# CI: make the optional PostgreSQL test of tests/snexp/runtime/test_workers.py run instead of skip.
# Installs the Debian server package (binaries only: the package's own cluster service is not
# started here, and CI containers have no init system to start it) and the Python driver.
# The test starts its own throw-away server on 127.0.0.1 and stops it, so nothing started here
# outlives the test run. Run as root (apt-get) before `python -m pytest`.
set -euo pipefail

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # A policy-rc.d that exits 101 keeps the package from starting its cluster service
    # (Debian's documented switch); an image's own policy-rc.d is left as it is.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends postgresql > /dev/null
fi
python -m pip install -q "psycopg[binary]>=3.1"
ls -d /usr/lib/postgresql/*/bin
