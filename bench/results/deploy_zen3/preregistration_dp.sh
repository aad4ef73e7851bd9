#!/usr/bin/env bash
# Pre-registered 2026-12-06, written 08:12-08:16 UTC and committed (08:16:01) before this run started (08:16:02).
# (As first committed, this line said 09:21-09:25: a wrong guess of the time, corrected after the start.)
# Question: `python -m dpq.pareto --prefix-points dp` (3910fb5) reads a dpq run's recovery record as the point
# of the dp preset with the same settings, because a `pipeline=dp` run trains exactly that prefix. Is that so?
# Test: run `experiment=far_u80 pipeline=dp seed=42` for real, cold (the code changed since the cache was
# filled, so nothing is reused), on this Zen 3 EPYC, which reproduced the Zen 2 study machine's deploy70mix
# seed 42 bit for bit (BENCHMARKS "Goal 2's point on a Zen 3 EPYC"). Compare its final record with the
# recovery record of bench/results/front_epyc/fu80-s42 (the Zen 2 EPYC, commit b6d1920), the dp point that
# --prefix-points reads for seed 42 at 80%.
# Prediction, written now: the dp run's final test accuracy, validation accuracy, validation loss and effective
# GFLOPs equal that record's (0.8543046116828918, 0.861873209476471, 0.36222007870674133, 0.07839328) to every
# printed digit. If they differ, the closing note says so and the dp rows of the reports built with
# --prefix-points are described as read off dpq runs, not as dp runs. Reported whatever it shows.
# Code: a clean clone of main at the commit that adds this file; one job, nothing else heavy running.
source /work/main/.venv/bin/activate
rm -rf /work/runclone3 && git clone -q /work/main /work/runclone3 && cd /work/runclone3
export PYTHONPATH=/work/runclone3/src DPQ_CACHE_DIR=/work/runs/cache
R=/work/runs/Z
echo "START dpfu80-s42 $(date -u +%T) $(git rev-parse --short HEAD)"
python -m dpq.train experiment=far_u80 pipeline=dp seed=42 logger=csv hydra.run.dir=$R/dpfu80-s42 > $R/dpfu80-s42.log 2>&1
echo "END dpfu80-s42 rc=$? $(date -u +%T)"
