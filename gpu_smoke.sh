#!/usr/bin/env bash
# GPU smoke test: every CUDA path of the repository once, on a small config, in a few minutes.
#
#     bash gpu_smoke.sh [OUT_DIR]          (DEVICE=cpu bash gpu_smoke.sh runs the same steps on a CPU)
#
# Needs the CUDA build of torch (README, "Larger models and GPUs"). Steps and what each must print:
#   1. pre-training with bf16 autocast            -> "saved the base model (EMA)", "register check"
#   2. DRAGON, 2 rounds, bf16 demonstrations      -> "done: held-out aesthetics ... win rate"
#   3. the same command with dragon.rounds=3      -> "resumed ... at round 2" (Adam's state from the CPU)
#   4. KTO with dragon.loss_bf16=true             -> "done: checkpoint .../kto/dragon.pt"
#   5. torchrun --nproc_per_node=1 train.py       -> NCCL on one GPU: "done: checkpoint .../torchrun/dragon.pt"
#   6. eval.py on three rewards                   -> eval.md with a row per reward
# It ends with "GPU SMOKE PASSED" and the GPU's peak memory, or stops at the first failing step.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/gpu_smoke}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
SMALL=(device=$DEVICE out_dir=$OUT data.n_train=1024 data.n_valid=64 data.n_test=64 pretrain.steps=300
       pretrain.n_check=16 clap.steps=300 aesthetics.max_clips=400 reward.n_reference=64
       dragon.prompts_per_round=16 dragon.n_eval=16 dragon.eval_every=1 dragon.ckpt_every=1 eval.n_prompts=16)
step() { echo; echo "=== $1"; shift; "$@" 2>&1 | grep -v "it/s\]" | tee -a "$OUT/smoke.log" | tail -n 4; }
mkdir -p "$OUT"; : > "$OUT/smoke.log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
t0=$(date +%s)
step "1. pre-training (bf16)" $PY pretrain.py config.yaml "${SMALL[@]}" pretrain.bf16=true
step "2. DRAGON, 2 rounds (bf16 demonstrations)" $PY train.py config.yaml "${SMALL[@]}" dragon.rounds=2 dragon.bf16=true
step "3. resume to 3 rounds" $PY train.py config.yaml "${SMALL[@]}" dragon.rounds=3 dragon.bf16=true
grep -q "resumed .* at round 2" "$OUT/smoke.log"
step "4. KTO, bf16 loss" $PY train.py config.yaml "${SMALL[@]}" dragon.rounds=2 dragon.run_name=kto dragon.loss=kto \
    dragon.sets=unpaired dragon.loss_bf16=true
step "5. torchrun, one process" $PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py config.yaml \
    "${SMALL[@]}" dragon.rounds=2 dragon.run_name=torchrun
step "6. eval.py on three rewards" $PY eval.py config.yaml "${SMALL[@]}" eval.prompt_sets=[heldout] \
    "eval.rewards=[aesthetics,fad_per_song/latent/audio:alim,vendi/clap]"
grep -c "^| heldout" "$OUT/dragon/eval.md"
echo; echo "GPU SMOKE PASSED in $(( $(date +%s) - t0 )) s (device $DEVICE); log: $OUT/smoke.log"
