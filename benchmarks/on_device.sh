#!/usr/bin/env bash
# One call of a lent GPU machine (no package registry there): the device tool's `run` starts this in a copy of the
# working tree, with .whl/ carried (`bash benchmarks/device_wheels.sh` fills it here first).
#
#   bash benchmarks/on_device.sh gpu                     # then: gpu_contenders; gpu_smoke --only RECIPE ...
#
# It installs the wheels into /tmp/site once per machine (kept while the machine stays warm), prints the device,
# runs benchmarks/<NAME>.py with the arguments given, stopped after LIMIT_S seconds (default 540, under the
# device's 600 s a command), and copies benchmarks/results/*.json and benchmarks/README.md (whose tables the
# benchmark rewrote) to $OUT, which the device tool brings back, also when the benchmark failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash benchmarks/on_device.sh NAME [ARGS...]  (NAME: gpu, gpu_contenders, gpu_smoke)" >&2; exit 2; }
name=$1; shift
PYTHON=${PYTHON:-python3}  # the machine's Python with its CUDA torch
[ -f "benchmarks/$name.py" ] || { echo "error: no benchmarks/$name.py" >&2; exit 2; }
if [ -d .whl ] && [ ! -f /tmp/site/.ftkit_installed ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
        && touch /tmp/site/.ftkit_installed || echo "warning: installing .whl/ failed" >&2
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
timeout --signal=TERM --kill-after=20 "${LIMIT_S:-540}" "$PYTHON" "benchmarks/$name.py" "$@"
rc=$?
[ $rc -eq 124 ] && echo "benchmarks/$name.py: stopped after ${LIMIT_S:-540} s" >&2
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp benchmarks/results/*.json "$OUT/results/" && cp benchmarks/README.md "$OUT/"
fi
exit $rc
