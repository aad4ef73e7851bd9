#!/usr/bin/env bash
# Pre-registered 2026-12-06, written 08:02-08:05 UTC and committed at 08:05, before this measurement ran.
# Question: README's quick start says the `make run` recipe (experiment=deploy: 50% of heads and neurons, 4-bit
# with dynamic int8 activations, ONNX Runtime) is "not yet measured on an AVX2-only CPU" against the free
# baseline (ONNX Runtime's dynamic int8 of the dense student). This machine is one: AMD EPYC family 25 model 1
# (Zen 3, AVX2, no AVX-512, no VNNI), 2 cores. Its model exists already: last session's fresh-clone `make run`
# (commit 047fb38, clean, empty stage cache, 07:15-07:40 UTC today; test .8600, ONNX .8609, 7.83 MB), kept
# in /work/runclone2/outputs/2026-12-06/07-15-26-652638_dpq-rotten_tomatoes-minilm_l3-s42 (linked as makerun-s42).
# Timed in one process with the seed-42 dense student and deploy70mix trained on this machine (deploy_zen3/).
# No training; latency only; nothing else running.
# Predictions, written now: (1) the `make run` model in ONNX Runtime is faster than the free baseline at batch 1
# and 32, by at least 1.5x at each (paired interval's lower end); (2) it is slower than deploy70mix in ONNX
# Runtime at both (more heads and neurons); (3) it is >= 3x the PyTorch fp32 dense student at both.
# Reported whatever it shows; the README sentence is replaced by the measured figures. Decision rule: none.
source /work/main/.venv/bin/activate
cd /work/runs/Z
python /work/main/bench/latency.py --onnx --batches 1 32 --rounds 20 --baseline dense "dense ORT int8 dynamic" \
  --no-teacher --out /work/runs/Z/latency_makerun_s42.json dense-s42 makerun-s42 deploy70mix-s42 > /work/runs/Z/latency_makerun.log 2>&1
echo "LATENCY rc=$? $(date -u +%T)"
