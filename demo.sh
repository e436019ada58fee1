#!/usr/bin/env bash
# nnunet-semi demo: installs the plugin (editable, from this repository) and runs the end-to-end demo.
#   ./demo.sh                     synthetic data, about 4 min on 2 CPU cores (3 min 50 s measured)
#   ./demo.sh --quick             smoke test, a minute or two
#   ./demo.sh --hippocampus ../shared/data/hippocampus --labeled 4 --max-cases 40
#   ./demo.sh --help              all options
# Paths are relative to the folder you run it from (work folder: --out, default ./nnunet_semi_demo).
# Set NNUNET_SEMI_DEMO_SKIP_INSTALL=1 to skip the pip step (plugin already installed); PYTHON=... picks
# the interpreter.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if [ "${NNUNET_SEMI_DEMO_SKIP_INSTALL:-0}" != "1" ]; then
    echo "installing nnunet-semi from $REPO (python -m pip install -e) ..."
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$REPO"
fi
exec "$PYTHON" -m nnunet_semi.demo "$@"
