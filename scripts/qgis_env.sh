#!/usr/bin/env bash
# Prepare the Python that runs the QGIS plugin tests: Debian's QGIS (python3-qgis) + a venv that sees it.
#
#   scripts/qgis_env.sh [VENV]     (default .venv-qgis)
#
# QGIS's Python bindings come from the distribution, for the system python3 (they cannot be pip-installed).
# When they are missing, this installs them with apt if it may (root on Debian/Ubuntu). Otherwise it says
# so and exits with status 10, and `make test` reports the plugin tests as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-qgis}
QGIS_PY=${QGIS_PYTHON:-/usr/bin/python3}
PACKAGES="python3-qgis qgis-providers python3-venv"

if ! "$QGIS_PY" -c "import qgis.core" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "qgis_env: installing QGIS for $QGIS_PY with apt ($PACKAGES, ~1 GB)..."
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null; }
    else
        echo "qgis_env: QGIS's Python (python3-qgis) is not installed and this user cannot install it" \
             "(needs root with apt on Debian/Ubuntu)."
        exit 10
    fi
fi
"$QGIS_PY" -c "import qgis.core" || { echo "qgis_env: python3-qgis installed but 'import qgis.core' fails"; exit 10; }

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import qgis.core, pytest_qgis" 2>/dev/null; then
    rm -rf "$VENV"
    "$QGIS_PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt pytest pytest-qgis
fi
echo "qgis_env: $("$VENV/bin/python" -c 'from qgis.core import Qgis; print("QGIS", Qgis.QGIS_VERSION)') in $VENV"
