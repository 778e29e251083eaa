#!/usr/bin/env bash
# One device call's worth of measurements for the speed issue, every output teed to files under $OUT
# (a device reply keeps only the end of the output). Run from the repository root on the GPU machine:
#
#     OUT=/path/to/results bash benchmarks/gpu_session.sh [OLD_PACKAGE_DIR]
#
# OLD_PACKAGE_DIR (optional): a folder holding an older `prune/` package (`git archive REV prune | tar -x
# -C DIR`) for before/after rows of the floor diagnostic. Each step has its own time limit, so one that
# hangs does not take the call's budget; about 10 minutes in all on an H100 / H200.
set -u
OUT=${OUT:?set OUT to the folder the results go to}
OLD=${1:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.

step() {  # step NAME SECONDS COMMAND...: run it, output to $OUT/NAME.txt, one status line here
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: rc=$? ($(tail -n 1 "$OUT/$name.txt" | cut -c1-150))"
}

python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step gpu_tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_sync.py tests/test_early_selection.py
step sync_count 120 python3 benchmarks/sync_count.py --out "$OUT/sync_count.json"
step floor_b8 150 python3 benchmarks/diag/prefill_floor.py --methods random,hiprune,cls --rounds 12 --json "$OUT/floor_b8.json"
if [ -n "$OLD" ]; then
    step floor_b8_old 150 env PYTHONPATH="$OLD:$PYTHONPATH" python3 benchmarks/diag/prefill_floor.py \
        --methods random,hiprune,cls --rounds 12 --json "$OUT/floor_b8_old.json"
fi
step bench_eager_b8 240 python3 -m prune.cli bench --model llava-1.5-7b --methods random,cls,hiprune --keep 0.33,0.11 \
    --batch 8 --rounds 8 --warmup 2 --new-tokens 8 --no-progress --out "$OUT/eager_b8"
step bench_llm_b8 240 python3 -m prune.cli bench --model llava-1.5-7b --methods fastv,pdrop,transprune --keep 0.5 \
    --batch 8 --rounds 8 --warmup 2 --new-tokens 8 --no-progress --out "$OUT/llm_b8"
step qwen_phases 180 python3 benchmarks/diag/encoder_stage_phases.py
