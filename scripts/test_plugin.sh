#!/usr/bin/env bash
# The QGIS plugin tests, inside a real headless QGIS (run by `make test` after the engine tests).
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/qgis_env.sh .venv-qgis
status=$?
if [ "$status" = 10 ]; then
    echo "PLUGIN TESTS SKIPPED: QGIS (python3-qgis) is not available on this machine; the engine tests above ran."
    exit 0
elif [ "$status" != 0 ]; then
    exit "$status"
fi
export QT_QPA_PLATFORM=offscreen
exec .venv-qgis/bin/python -m pytest -q -ra -p no:cacheprovider tests_qgis "$@"
