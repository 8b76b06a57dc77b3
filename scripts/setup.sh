#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv. Safe to rerun.
#
#   bash scripts/setup.sh            # package + dev extras (tests, offline assets)
#   EXTRAS=dev,vllm bash scripts/setup.sh   # GPU server with vLLM
#
# torch: a torch already importable in .venv is kept. Otherwise, on a machine whose
# system Python already has a CUDA torch, .venv is created with --system-site-packages
# so that build is reused; on a machine with an NVIDIA GPU and no torch, PyPI's default
# (CUDA) build is installed (override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0"
# plus PIP_INDEX_URL for another CUDA version); everywhere else the CPU build
# torch==2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GENRECAL_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "setup: reusing the system's CUDA torch (venv with --system-site-packages)"
        "$PY" -m venv --system-site-packages "$VENV"
        # On CUDA images "$PY" is often itself a venv holding that torch; a venv made from it sees only the
        # base interpreter's packages, so a .pth file adds the outer venv's site-packages.
        if "$PY" -c "import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)"; then
            site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
            "$PY" -c "import site; print('\n'.join(site.getsitepackages()))" > "$site/_system_python.pth"
        fi
    else
        "$PY" -m venv "$VENV"
    fi
fi
if [ -n "${SETUP_VENV_ONLY:-}" ]; then
    exit 0  # the caller installs into the fresh venv itself (bench/gpu_check.sh, offline wheels)
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if python -c "import torch" 2>/dev/null; then
    echo "setup: keeping torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing ${TORCH_SPEC:-torch} (CUDA build)"
    pip install -q "${TORCH_SPEC:-torch}"
else
    echo "setup: no GPU, installing the CPU build ${TORCH_SPEC:-torch==2.13.0}"
    pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q -e ".[${EXTRAS}]"
echo "setup: done ($(python -c 'import torch, transformers, zarr; print(f"torch {torch.__version__}, transformers {transformers.__version__}, zarr {zarr.__version__}")'))"
