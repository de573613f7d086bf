#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package registry (`make bench-gpu` there).
#
# Run here, where pip reaches PyPI:   bash benchmarks/device_wheels.sh [EXTRA==VERSION ...]
# It fills .whl/ (git-ignored, about 25 MB) with what a CUDA image that already holds torch, accelerate,
# pyarrow, pandas, tokenizers and huggingface-hub lacks to run ftkit, at the versions of this checkout's
# .venv (the ones the test suite passed with), for CPython 3.12 on x86-64 Linux (PY_VERSION=3.13 for another).
# bitsandbytes' wheel carries a library per CUDA release (130 MB unpacked); only the CUDA 13 and CPU ones are
# kept (CUDA_LIBS='cuda12[0-9]' for a CUDA 12 machine). deepspeed and rouge-score are built here from their
# sources (pure Python). Then, on the GPU machine, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 benchmarks/gpu.py && python3 benchmarks/gpu_contenders.py && python3 benchmarks/gpu_smoke.py
#
# A package that is older there than a wheel needs (`python3 -m pip check` there names it): pass it as EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY_VERSION=${PY_VERSION:-3.12}
CUDA_LIBS=${CUDA_LIBS:-cuda13[0-9]}
OUT=.whl
PACKAGES="bitsandbytes datasets dill multiprocess transformers peft pydantic pydantic_core annotated-types
typing-inspection hjson nltk defusedxml"
SOURCES="deepspeed rouge-score"

[ -x "$VENV/bin/python" ] || { echo "error: no $VENV (run make test or make demo first: the versions come from it)" >&2; exit 2; }
pinned() {  # NAME -> NAME==VERSION as installed in the venv
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"
}

rm -rf "$OUT" && mkdir -p "$OUT"
platforms=""
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
    platforms="$platforms --platform ${tag}_x86_64"
done
specs=$(for name in $PACKAGES; do pinned "$name"; done)
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp $platforms --platform any -d "$OUT" $specs "$@"
for name in $SOURCES; do
    DS_BUILD_OPS=0 "$VENV/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "$(pinned "$name")"
done

# bitsandbytes: keep the CPU library and the CUDA_LIBS ones (a wheel is a zip; pip installs what it holds)
wheel=$(ls "$OUT"/bitsandbytes-*.whl)
unpacked=$(mktemp -d)
(cd "$unpacked" && unzip -q "$OLDPWD/$wheel")
find "$unpacked/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cpu.so' \
    ! -name "libbitsandbytes_${CUDA_LIBS}.so" -delete
rm "$wheel" && (cd "$unpacked" && zip -q -r "$OLDPWD/$wheel" .) && rm -rf "$unpacked"
du -sh "$OUT"
ls "$OUT"
