#!/usr/bin/env bash
# The CIFAR-10 study of results/cifar10-study/, in one command:
#   scripts/cifar10-study.sh "$DATA/cifar10-5k"   (tar -xzf cifar10-5k.tar.gz -C "$DATA" first; any folder)
# Trains TNT (recipes/cifar10-study.yaml), the DeiT of the same width and depth, and TNT without inner transformer,
# word and sentence position encodings, 3 seeds each (15 runs under runs/cifar10-study; finished runs are
# reused and interrupted ones resumed on a rerun), then writes the ablation table, the TNT-vs-DeiT comparison,
# their plots and a visualisation of the TNT baseline (seed 0) into results/cifar10-study/.
# TNT="python -m tntcli.cli" runs it without the installed `tnt` entry point.
set -euo pipefail
DATA=${1:-}
if [ -z "$DATA" ] || [ ! -d "$DATA/train" ] || [ ! -d "$DATA/val" ]; then
  echo "usage: scripts/cifar10-study.sh CIFAR10_5K_DIR   (a folder with train/ and val/: unpack cifar10-5k.tar.gz)" >&2
  exit 2
fi
TNT=${TNT:-tnt}
RUNS=runs/cifar10-study
OUT=results/cifar10-study
start=$(date +%s)
$TNT ablate --recipe cifar10-study --data "$DATA" --seeds 3 --vs-deit --no-inner --no-word-pos --no-sentence-pos \
  --name cifar10-study --runs "$RUNS" --out "$OUT"
$TNT results --runs "$RUNS" --out "$OUT"
checkpoint=$(ls "$RUNS"/tnt-ti-baseline-s0-*/best.pt | head -n 1)
image=$(ls "$DATA"/val/cat/* | head -n 1)
$TNT viz --checkpoint "$checkpoint" --image "$image" --out "$OUT/viz" --blocks 1,2,4
echo "study wall time: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
