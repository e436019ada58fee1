#!/usr/bin/env bash
# Installs nnunet-semi with its test dependencies (nnunetv2 and torch come from PyPI) and runs the whole
# test suite on CPU: unit tests, converters on ../shared/data, and end-to-end runs of nnU-Net's commands.
# --fast runs only the tests not marked slow (no nnU-Net command runs, no training of minutes). Other
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
args=()
for a in "$@"; do
    if [[ "$a" == "--fast" ]]; then
        args+=(-m "not slow")
    else
        args+=("$a")
    fi
done
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
export MPLBACKEND=Agg
exec python3 -m pytest -q -rs ${args[@]+"${args[@]}"} tests
