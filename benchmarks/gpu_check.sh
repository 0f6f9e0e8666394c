#!/usr/bin/env bash
# Every GPU measurement of xmodal in one run (about 8 minutes on one H200; each part has its own
# time cap inside benchmarks/gpu_check.py, and the whole run a hard one here).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_check.py options]   # e.g. --parts eval,train
#   bash benchmarks/gpu_check.sh /tmp/gpu-dry --dry-run                     # tiny, CPU
#
# Results: OUT_DIR/gpu_check.json (default gpu_check_out/), and OUT_DIR/env.txt (nvidia-smi).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-gpu_check_out}"
shift || true
mkdir -p "$out"
{ date -u; nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"; } > "$out/env.txt"
python=${PYTHON:-python}
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-480}" "$python" "$here/gpu_check.py" --out "$out" "$@"
