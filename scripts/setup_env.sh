#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it. Idempotent: a stamp file
# keyed on pyproject.toml skips the pip calls when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
fi
stamp=".venv/.setup-stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
# the stamp alone is not enough: an editable install can go stale (e.g. registered as a
# namespace package, which monai.bundle refuses), so also check the package imports as ours
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && (here="$PWD"; cd / && "$here/.venv/bin/python" -c 'import monai_hsrdiff, sys; sys.exit(monai_hsrdiff.__file__ is None)') 2>/dev/null; then
    exit 0
fi
echo "[setup] installing torch==2.13.0 (CPU build) first, then the project"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] done"
