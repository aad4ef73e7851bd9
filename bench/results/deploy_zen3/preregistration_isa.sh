#!/usr/bin/env bash
# Pre-registered 2026-12-06, written 05:53-05:57 UTC, before this run; it starts after preregistration.sh ends.
# Question: the same recipe and seed (deploy70mix, seed 42) gives equal accuracies after every float stage on
# three machines (Xeon, two Zen 2 EPYCs, val loss equal to 5-6 digits) but three different 4-bit QAT results
# (.8657/.8562, .8685/.8543, .8666/.8543 val/test). Is the difference in torch's CPU kernels alone? Same machine,
# code, libraries and cache folder as preregistration.sh; only torch's kernel instruction set changes
# (ATEN_CPU_CAPABILITY=default instead of avx2; the stage cache keys on it, so no stage may be served from the
# avx2 run: checked in results.json, every stage cached=false).
# Predictions, written now: teacher, distillation, prune and recovery end at the avx2 run's accuracies (val and
# test) with val losses equal to at least 5 digits; the QAT stage ends at a different accuracy.
# Reported whatever it shows, per stage against the avx2 run; no decision rides on it.
source /work/main/.venv/bin/activate
cd /work/runclone
export PYTHONPATH=/work/runclone/src DPQ_CACHE_DIR=/work/runs/cache
R=/work/runs/Z
N=deploy70mix-s42-isadefault
echo "START $N $(date -u +%T)"
ATEN_CPU_CAPABILITY=default python -m dpq.train experiment=deploy70mix seed=42 logger=csv export.onnx=false \
  hydra.run.dir=$R/$N > $R/$N.log 2>&1
echo "END $N rc=$? $(date -u +%T)"
