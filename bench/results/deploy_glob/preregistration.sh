#!/usr/bin/env bash
# Pre-registered 2026-12-06, written 13:25-13:30 UTC and committed before any of these runs starts.
# Question: goal 2 of issue 21 (heads+neurons at >= 3x fewer dense GFLOPs + 4-bit, within 1 point of dq) holds on
# the mean only with deploy70mix (uniform: 6 of 12 heads and 292 of 1536 neurons kept in every layer; five seeds
# -0.49 [-1.06, +0.08] against LSQ dq). The flops_target allocation (heads and neurons removed across the model,
# lowest Taylor importance per FLOP first) was judged worse on a ranking bug (fixed in de6d5b1); with the fix,
# deploy40fix-s43 gained 1.52 validation points over deploy60-s43 at the same GFLOPs (one seed). Does the fixed
# allocation beat deploy70mix at the same budget, everything else equal?
# Recipe: experiment=deploy70 pipeline.stages.prune.flops_target=0.301 (deploy70mix's dense GFLOPs, 0.1054 of the
# dense student's 0.3502, i.e. 3.32x fewer; 8 recovery epochs, LSQ 4-bit QAT, 4-bit embedding table, as deploy70mix).
# Seeds 42, 43, 44, in this order, one job at a time, nothing else heavy beside them; seed 44 starts only if it can
# start by 14:50 UTC (else the study is two seeds and says so). Code: main at the commit that adds this file, in a
# clean clone. Machine: this 2-core AuthenticAMD family 25 model 1 (Zen 3). Comparator: deploy70mix s42-44 of the
# Zen 2 study machine (bench/results/deploy_epyc_b; its s42 was reproduced here to every recorded digit,
# bench/results/deploy_zen3/deploy70mix-s42), paired by seed.
# Predictions, written now: (1) the kept heads per layer are not equal across the three layers on any seed;
# (2) the mean paired validation accuracy difference against deploy70mix (s42-44) is above 0.
# Decision rule (validation only): if (2) holds, conf/experiment/deploy70glob.yaml is added as goal 2's candidate
# recipe, to be judged on five seeds (45 and 46 in a later session); goal 2's verdict stays deploy70mix's until
# then. If it does not hold, deploy70mix stays the recipe and BENCHMARKS says so. Test accuracy, paired with
# deploy70mix and LSQ dq, is reported whatever it shows and chooses nothing.
source /work/main/.venv/bin/activate
cd /work/runclone4
export PYTHONPATH=/work/runclone4/src DPQ_CACHE_DIR=/work/runs/cache
R=/work/runs/G; mkdir -p $R
run() { N=$1; shift; echo "START $N $(date -u +%T)"; python -m dpq.train "$@" logger=csv hydra.run.dir=$R/$N > $R/$N.log 2>&1; echo "END $N rc=$? $(date -u +%T)"; }
for S in 42 43 44; do
  if [ $S = 44 ] && [ "$(date -u +%H%M)" -gt 1450 ]; then echo "SKIP s44 $(date -u +%T)"; break; fi
  run deploy70glob-s$S experiment=deploy70 seed=$S pipeline.stages.prune.flops_target=0.301
done
echo ALLDONE
