#!/usr/bin/env bash
# The GPU checks in one call: CUDA tests of the kernels and ops, the benchmarks, a step profile.
#
#   bash experiments/gpu_check.sh [OUTDIR]      # default OUTDIR: experiments/results/gpu_run
#   STAGES="train compile" T_TRAIN=80 bash experiments/gpu_check.sh /tmp/out  # some stages
#
# Issue 22 (persistent, TMA grouped GEMM) in two calls of under 10 minutes each:
#   STAGES="tests gemm layer layer_fine kernels" bash experiments/gpu_check.sh /tmp/out
#   STAGES="compile compile_triton before_after" BEFORE=<rev> bash experiments/gpu_check.sh /tmp/out
# `gemm` times forward, dX and dW one by one against torch._grouped_mm and reports whether the
# compiled kernels use TMA; `before_after` runs it on BEFORE (default: the merge base with main
# before issue 22) and on this tree alternately (needs the tree's .git), or on BEFORE_TREE, an
# exported old tree carried along (`git archive 875c49c | tar -x -C .before`; carry .before).
#
# Runs against the machine's own python3/torch/triton/transformers. Packages missing there can be
# carried as wheels in .whl/ (installed into /tmp/site). Each stage has its own time limit so that
# one slow stage cannot starve the rest; the logs and the markdown report land in OUTDIR.
set -u
OUT_DIR=${1:-experiments/results/gpu_run}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)  # absolute: some stages run in another tree
ROOT=$PWD
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export MOE_LM_KERNEL_AUTOTUNE=${MOE_LM_KERNEL_AUTOTUNE:-1}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# moe_lm.kernels and moe_lm.conf are kernels/ and conf/ (pyproject's package-dir), without an
# install: links in this copy of the tree
[ -e moe_lm/kernels ] || ln -s ../kernels moe_lm/kernels
[ -e moe_lm/conf ] || ln -s ../conf moe_lm/conf
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
REPORT=$OUT_DIR/report.md

stage() {  # stage NAME SECONDS CMD...: runs CMD under a limit, log in OUT_DIR/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    tail -n "${TAIL:-6}" "$OUT_DIR/$name.log"
}

{
    echo "# GPU run $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
} > "$REPORT" 2>&1
cat "$REPORT"

MODEL="--layers 12 --d-model 1536 --heads 12 --kv-heads 4 --experts 8 --top-k 2 --hidden 2048 \
    --seq-len 2048 --batch 8"  # about 1.1B parameters, 0.46B active per token
for name in ${STAGES:-tests gemm layer layer_fine kernels train profile compile compile_triton}; do
    case $name in
    tests)  # correctness first: the CUDA tests, 8 processes (each compiles its kernels)
        MOE_LM_KERNEL_AUTOTUNE=0 TAIL=25 stage gpu_tests "${T_TESTS:-150}" python3 -m pytest -q \
            -m gpu -p no:cacheprovider -n 8 --tb=short ${TEST_PATHS:-tests/kernels tests/ops} ;;
    train)
        stage bench_train "${T_TRAIN:-110}" python3 experiments/bench_train.py --device cuda \
            $MODEL --backends "${BACKENDS:-torch,triton}" --hf-impls "${HF_IMPLS:-eager,grouped_mm}" \
            --steps 6 --warmup 3 --markdown "$REPORT" ;;
    profile)
        TAIL=45 stage profile "${T_PROFILE:-60}" python3 experiments/profile_step.py --device cuda \
            $MODEL --steps 2 --warmup 2 ;;
    compile)
        stage bench_train_compile "${T_COMPILE:-150}" python3 experiments/bench_train.py \
            --device cuda $MODEL --compile --hf-impls "" --steps 5 --warmup 2 --markdown "$REPORT" ;;
    layer)
        stage bench_layer "${T_LAYER:-50}" python3 experiments/bench_moe_layer.py --tokens 16384 \
            --d-model 1536 --hidden 2048 --reps 20 --warmup 3 --markdown "$REPORT" ;;
    layer_fine)  # fine-grained: 64 experts top-6, F 688 (6 x 688 ~ the 2 x 2048 of `layer`)
        stage bench_layer_fine "${T_LAYER:-50}" python3 experiments/bench_moe_layer.py \
            --tokens 16384 --experts 64 --top-k 6 --d-model 1536 --hidden 688 --reps 20 --warmup 3 \
            --markdown "$REPORT" ;;
    gemm)  # issue 22: fwd / dX / dW vs torch._grouped_mm, tile choice, TMA in the PTX
        TAIL=20 stage bench_grouped_gemm "${T_GEMM:-120}" python3 \
            experiments/bench_grouped_gemm.py --out "$REPORT" ;;
    compile_triton)  # the MFU target is for expert.backend=triton with trainer.compile=true
        stage bench_train_compile_triton "${T_COMPILE:-150}" python3 experiments/bench_train.py \
            --device cuda $MODEL --compile --backends triton --hf-impls "" --steps 5 --warmup 2 \
            --markdown "$REPORT" ;;
    before_after)  # old kernels and new in the same session
        if [ -n "${BEFORE_TREE:-}" ]; then  # an exported old tree (git archive REV | tar -x -C DIR)
            [ -e "$BEFORE_TREE/moe_lm/kernels" ] || ln -s ../kernels "$BEFORE_TREE/moe_lm/kernels"
            for tree in "$BEFORE_TREE" "$PWD"; do
                (cd "$tree" && PYTHONPATH=$tree TAIL=20 stage "before_after_$(basename "$tree")" \
                    "${T_BEFORE:-120}" python3 "$ROOT/experiments/bench_grouped_gemm.py" \
                    --shapes mixtral fine layer --out "$REPORT")
            done
        elif git rev-parse --git-dir >/dev/null 2>&1; then
            PYTHON=python3 TAIL=40 stage before_after "${T_BEFORE:-240}" \
                bash experiments/compare_commits.sh \
                "${BEFORE:-875c49c}" 1 "$PWD/experiments/bench_grouped_gemm.py" \
                --shapes mixtral fine layer
        else
            echo "=== before_after: skipped, this copy has no .git (carry it, or set BEFORE tree)"
        fi ;;
    kernels)
        stage bench_kernels "${T_KERNELS:-90}" python3 experiments/bench_kernels.py \
            --shapes mixtral fine --out "$REPORT" ;;
    esac
done
echo "=== done"
