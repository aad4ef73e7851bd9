#!/usr/bin/env bash
# Pre-registered 2026-12-06, written 11:28-11:29 UTC and committed before this run starts.
# Question: deploy40-s43 (experiment=deploy, flops_target=0.4: heads and neurons removed across the model,
# lowest Taylor importance per FLOP first) lost 4 points of test accuracy against deploy60-s43 (uniform 60% per
# layer) at the same GFLOPs, and BENCHMARKS concluded the global allocation is the worse recipe. Found today:
# that ranking divided the L2 norm by the group's size, so every head ranked 8x below an equally important
# neuron and the run kept one head per layer (min_keep). Fixed in de6d5b1 (additive scores). What does the
# flops_target allocation give with the fixed ranking, on the same seed and machine type as nothing else?
# Run: seed 43 only (~14 min cold), code de6d5b1 + this file (a clean clone), this machine (AuthenticAMD family 25
# model 1, Zen 3; deploy40-s43 ran on the Xeon, deploy60-s43 too: machines differ, so the comparison is
# indicative, one seed, not a claim). One job, nothing else heavy.
# Predictions, written now: (1) more than one head per layer is kept; (2) validation accuracy above deploy40-s43's
# 0.8373. No prediction against deploy60-s43 (0.8486 val).
# Reported, whatever it shows: the kept heads/neurons per layer, dense GFLOPs, val/test next to deploy40-s43 and
# deploy60-s43. Decision rule: none; README/BENCHMARKS keep "measured the bug" for the old rows either way.
source /work/main/.venv/bin/activate
cd /work/runclone3
export PYTHONPATH=/work/runclone3/src DPQ_CACHE_DIR=/work/runs/cache
R=/work/runs/Z
echo "START $(date -u +%T)"
python -m dpq.train experiment=deploy seed=43 logger=csv pipeline.stages.prune.flops_target=0.4 \
  hydra.run.dir=$R/deploy40fix-s43 > $R/deploy40fix-s43.log 2>&1
echo "END rc=$? $(date -u +%T)"
