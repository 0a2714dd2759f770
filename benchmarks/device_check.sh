#!/usr/bin/env bash
# The prepared device check (issue 30) on a GPU machine without network: install what is missing
# without touching the machine's jax, jaxlib, numpy or torch, then run benchmarks/device_check.py.
#
# Beforehand, on a machine with network, fetch the wheels it lists (the command is at the top of
# benchmarks/device_wheels.txt) into benchmarks/wheels/:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d benchmarks/wheels \
#       -r benchmarks/device_wheels.txt
#
# Then, on the GPU machine, from anywhere:
#
#   benchmarks/device_check.sh                    # SD 1.5 rows, 8-minute budget; JSON + Markdown table
#   benchmarks/device_check.sh --dry_run          # the same code on the CPU, tiny shapes
#   benchmarks/device_check.sh --only train_b8,step_b1 --budget_s 300
#
# Environment: PYTHON (default python), DEVICE_WHEELS (default benchmarks/wheels). Every flag goes to
# python -m benchmarks.device_check (see --help there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=${DEVICE_WHEELS:-benchmarks/wheels}

# "required" or "optional" pins of device_wheels.txt whose distribution is not installed at all.
missing() {
  "$PY" - "$1" benchmarks/device_wheels.txt <<'EOF'
import importlib.metadata as md
import sys

group, path = sys.argv[1], sys.argv[2]
section = None
for line in open(path):
  line = line.strip()
  if line.startswith("# --- "):
    section = line[6:].split(":")[0]
  elif line and not line.startswith("#") and section == group:
    name = line.split("==")[0]
    try:
      md.version(name)
    except md.PackageNotFoundError:
      print(line)
EOF
}

install() {  # pins... ; only from $WHEELS, never from an index, never their dependencies
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$@"
}

required=$(missing required)
if [ -n "$required" ]; then
  echo "device_check.sh: installing from $WHEELS: $(echo $required)"
  # shellcheck disable=SC2086
  install $required || {
    echo "device_check.sh: could not install $(echo $required) from $WHEELS; fetch the wheels first" \
         "(the pip download command at the top of benchmarks/device_wheels.txt)" >&2
    exit 2
  }
fi
optional=$(missing optional)
if [ -n "$optional" ]; then
  echo "device_check.sh: installing from $WHEELS (for the PyTorch baseline): $(echo $optional)"
  # shellcheck disable=SC2086
  install $optional || echo "device_check.sh: the PyTorch baseline's wheels did not all install;" \
                            "its rows will say whether diffusers imports" >&2
fi
# The project itself, editable and without dependencies. Offline there is no build isolation to set up;
# without setuptools it cannot install, and the check still runs from this directory.
"$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "device_check.sh: pip could not install the project (no setuptools?); running it from $(pwd)" >&2

exec "$PY" -m benchmarks.device_check "$@"
