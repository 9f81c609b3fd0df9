#!/usr/bin/env bash
# One-shot GPU check for issue #4 (run on a machine with one CUDA GPU; installs nothing).
#   1. the CUDA smoke tests (autocast + channels-last transfer, Adam and L-BFGS);
#   2. `mr2nst bench` on CUDA at the paper's settings: the plain loop (patch 512, Adam 400,
#      fp32, every tile) against the engine (time to reach the plain loss), plus the
#      default-config full transfer that the targets are about (<= 15 s, <= 6 GB peak);
#   3. the fast student (issue #14) on CUDA: a tiny student is trained on two phantoms (its
#      speed does not depend on its training), then `mr2nst bench --method fast` times it
#      on a 2294x1914 phantom (target <= 0.1 s).
# Results land in ${OUT:-.}/gpu-bench.json, ${OUT:-.}/gpu-fast-bench.json,
# ${OUT:-.}/gpu-pytest.txt and ${OUT:-.}/gpu-cad-study/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
PY="${PY:-.venv/bin/python}"
MR2NST="${MR2NST:-.venv/bin/mr2nst}"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print(torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
"$PY" -m pytest -q tests/core/test_engine_cuda.py 2>&1 | tee "$OUT/gpu-pytest.txt"
# Whole bench: plain loop ~8400 fp32 passes at 512^2 (minutes), then the engine runs.
timeout "${BENCH_TIMEOUT:-540}" "$MR2NST" bench --device cuda --patch-size 512 --iterations 400 \
    --default-run --json --out "$OUT/gpu-bench.json" > /dev/null
"$PY" - "$OUT/gpu-bench.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
print("speedup", d["speedup"], "reached", d["comparison"]["reached"])
print("plain s", round(d["plain"]["seconds"], 1), "engine s", round(d["engine"]["seconds"], 1))
dft = d.get("default", {})
print("default config s", dft.get("seconds"), "cuda MiB", dft.get("cuda_max_allocated_mb"))
PYEOF
# The fast student: its architecture at the defaults, a 1-epoch training on two phantoms.
FAST="$(mktemp -d)"
"$MR2NST" phantom "$FAST/p" --n 2 --size 256 208 --seed 3 > /dev/null
cat > "$FAST/node.toml" <<TOML
[engine]
features = "seeded-random"
patch_size = 64
iterations = 2
[methods]
references = 2
[bank]
path = "$FAST/bank"
allow_fewer = true
[fast]
checkpoint = "$FAST/fast.pt"
TOML
"$MR2NST" bank add "$FAST/p/uih" --config "$FAST/node.toml" > /dev/null
"$MR2NST" train-fast --source "$FAST/p/ge" --config "$FAST/node.toml" --out "$FAST/fast.pt" \
    --epochs 1 > /dev/null
timeout "${FAST_TIMEOUT:-120}" "$MR2NST" bench --method fast --config "$FAST/node.toml" \
    --no-teacher --json --out "$OUT/gpu-fast-bench.json" > /dev/null
"$PY" - "$OUT/gpu-fast-bench.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
print("fast student s", d["seconds"], "runs", d["seconds_runs"], "device", d["machine"]["device"])
PYEOF
# 4. Issue #15 on CUDA: one tiny CycleGAN epoch (--device cuda) and a tiny detection study
#    whose detectors train and read on the GPU (engine.device = "cuda").
CAD="$(mktemp -d)"
"$MR2NST" phantom "$CAD/train" --n 8 --size 192 160 --seed 11 > /dev/null
"$MR2NST" phantom "$CAD/test" --n 4 --size 192 160 --seed 12 > /dev/null
"$MR2NST" train-cyclegan --source "$CAD/test/ge" --target "$CAD/train/uih" \
    --out "$CAD/cyclegan.pt" --epochs 1 --steps-per-epoch 20 --device cuda
printf '[engine]\ndevice = "cuda"\nfeatures = "seeded-random"\n[methods]\nreferences = 2\n' \
    > "$CAD/cuda.toml"
"$MR2NST" cad-study --train "$CAD/train/uih" --test-uih "$CAD/test/uih" --test-ge "$CAD/test/ge" \
    --truth "$CAD/test/truth" --train-ge "$CAD/train/ge" --config "$CAD/cuda.toml" \
    --methods passthrough,ehm,cyclegan --test-b ehm --cyclegan "$CAD/cyclegan.pt" --epochs 5 \
    --quiet --out "$OUT/gpu-cad-study"
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print("cad-study device", d["device"], "s", d["seconds"])' \
    "$OUT/gpu-cad-study/study.json"
