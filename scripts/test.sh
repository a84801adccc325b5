#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole suite on both cores.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
.venv/bin/python -m pytest -n 2 --dist worksteal "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treated as a failure" >&2
    exit 1
fi
exit "$rc"
