#!/usr/bin/env bash
# The scale bench on a lent GPU machine, as one prepared run (device time is short).
#
#   bash bench/scale/gpu.sh OUT [SECONDS]
#
# 1. installs the wheels carried in .whl/ (what the machine's image lacks: mergekit, pydantic,
#    huggingface_hub 2.x, transformers 5.25, ...) into /tmp/site when .whl/ is there. Made here with
#    (30 MB; `echo /.whl/ >> .git/info/exclude` first, then carry ".whl" in the device call):
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#        --platform manylinux1_x86_64 -d .whl mergekit==0.1.5 transformers==5.25.0 huggingface_hub==2.4.0 \
#        httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 kernels==0.19.1 tomlkit==0.15.3 pydantic==2.14.4 \
#        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 immutables==0.21 cmaes==0.13.1 \
#        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 accelerate==1.16.0 click==8.5.1 \
#        hf-xet==1.8.0 fsspec==2026.9.0 typing-extensions==4.16.0 tokenizers==0.23.3
#    (2026-12-04: the whole script took longer than 560 s; give it 600 or drop the 3b step);
# 2. the fused combine's tests, and a smoke run on tiny experts (every strategy on the GPU); stops
#    there if the smoke run fails;
# 3. 1B, K = 4 and 8: in-memory against the floor with 256 dev rows; every strategy's s / eval
#    against the floor with 8, and a whole run in auto mode;
# 4. 3B (Llama-3.2-3B's shape), K = 4, when at least 4 minutes of SECONDS (default 480) are left.
# (Here, to try the script on CPU: DEVICE=cpu NO_WHEELS=1 ONLY_TINY=1 PY=.venv/bin/python.)
# Each step writes its results JSON and log under OUT; the experts are drawn on the GPU
# (build_experts.py --device cuda) and built into /tmp, never into the repo.
set -uo pipefail
OUT=${1:?usage: gpu.sh OUT [SECONDS]}
LIMIT=${2:-480}
DEVICE=${DEVICE:-cuda}
CACHE=${CACHE:-/tmp/scale-cache}
START=$SECONDS
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  df -h "$CACHE" /tmp . 2>/dev/null | sort -u
  nproc; free -g | head -2
  $PY -c "import torch, transformers, mergekit, swarm_merge; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

bench() {  # bench NAME ARGS...: one bench_scale run, its JSON and log under OUT
  local name=$1; shift
  echo "== $name ($((SECONDS - START)) s in)"
  $PY bench/scale/bench_scale.py --device "$DEVICE" --cache "$CACHE" --json "$OUT/$name.json" "$@" 2>&1 \
    | tee "$OUT/$name.log"
}

timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_fused_combine.py 2>&1 | tail -3 | tee "$OUT/fused.txt"
bench tiny --sizes tiny --experts 2 --repeats 1 --runs auto --tokenizer /nonexistent \
  || { echo "the tiny smoke run failed: stopping"; exit 1; }
[ -n "${ONLY_TINY:-}" ] && exit 0
# in-memory against the floor at the bench's 8 dev rows and at 256 (a dev set of a real size)
bench 1b-dev256 --sizes 1b --experts 4,8 --dev-rows 256 --strategies floor,in-memory --runs none \
  --tokenizer /nonexistent || echo "1b-dev256 failed"
bench 1b --sizes 1b --experts 4,8 --repeats 3 --runs auto --tokenizer /nonexistent || echo "1b failed"
[ -f "$CACHE/1b/.scale-bench" ] && rm -rf "$CACHE/1b"  # only a folder the bench's builder wrote (its marker)
if [ $((LIMIT - (SECONDS - START))) -ge 240 ]; then
  bench 3b --sizes 3b --experts 4 --repeats 3 --runs auto --tokenizer /nonexistent || echo "3b failed"
else
  echo "== 3b skipped: $((LIMIT - (SECONDS - START))) s left of $LIMIT"
fi
echo "== done in $((SECONDS - START)) s"
