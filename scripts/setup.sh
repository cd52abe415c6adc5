#!/usr/bin/env bash
# Install everything Tandem needs on Debian 12 with Python 3.11. Safe to run again.
#
#   bash scripts/setup.sh            # installs into `python` from PATH (else `python3`)
#   PYTHON=/path/to/python bash scripts/setup.sh
set -euo pipefail

cd "$(dirname "$0")/.."
# The same interpreter the README's `python -m pytest -q` will run.
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup: $PYTHON is older than Python 3.11" >&2; exit 1; }

# System packages: Icarus (second simulator), PoCL (OpenCL on the CPU), Tcl (vendor scripts),
# ccache (Verilator builds share their runtime objects; see sim/runner.py).
apt_packages=(iverilog pocl-opencl-icd tcl ccache)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: apt packages already present: ${apt_packages[*]}"
elif [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing apt packages: ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "setup: not root, skipping apt. Install these yourself:" \
        "sudo apt-get install ${missing[*]}" >&2
fi

# Python packages, pinned in pyproject.toml. torch is pinned exactly: a looser pin pulls CUDA.
"$PYTHON" -m pip install -e '.[dev]'
# Only for its MIT-licensed GPT-2 vocabulary (whisper/assets/gpt2.tiktoken), so the
# tokenizer works offline. --no-deps: whisper's own dependencies (numba, ...) are not needed.
"$PYTHON" -m pip install --no-deps openai-whisper==20250625

echo "setup: done"
