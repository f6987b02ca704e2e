#!/usr/bin/env bash
# One device call (METHOD.md: one script per call): install the checkout (no network there),
# then run the named phases; logs and JSON land in $OUT, a short table is printed last.
#   bash scripts/gpu_session.sh kernels model bench
# phases: kernels attnbench attn profile fused equiv quick model bench step256 long fp8
#         fp8long kvfp8 kvfp8long serve
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
    | tee "$OUT/gpus.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 \
    | grep -v -i warning | tail -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

note() { echo "$*" | tee -a "$SUMMARY"; }
bench() {  # bench NAME ARGS...: one `trtdist bench` run, JSON kept
    local name=$1; shift
    timeout ${BENCH_TIMEOUT:-900} python3 -m trtdist.cli bench "$@" --output "$OUT/bench_$name.json" \
        > "$OUT/bench_$name.log" 2>&1
    note "bench $name rc=$? $(python3 scripts/summarize_bench.py "$OUT/bench_$name.json" 2>&1)"
}

run_tests() {  # run_tests TAG SECONDS PYTEST_ARGS...: a pytest run, its log kept, its failures
  # and last line in the summary
  local tag=$1 secs=$2; shift 2
  timeout "$secs" python3 -m pytest -q -rf "$@" 2>&1 | tee "$OUT/${tag}_tests.log" \
      | grep -E "^FAILED|^E  " | cut -c1-300 | head -20
  note "$tag tests on $(nvidia-smi -L | wc -l) GPU(s): $(tail -1 "$OUT/${tag}_tests.log")"
}

batch1_ab() {  # batch1_ab VAR OFF ON PATTERN DTYPES...: FP8 batch-1 timelines with the
  # environment variable VAR at OFF, then ON (the lines matching PATTERN kept in the summary),
  # then batch-1 TPOT off / on for each of DTYPES (fp8, bf16): one A/B in one call
  local var=$1 off=$2 on=$3 pattern=$4 v d q; shift 4
  local m="llama3-8b --dummy-weights --dtype bfloat16"
  local b="--num-requests 1 --input-len 128 --output-len 256"
  for v in "$off" "$on"; do
    env "$var=$v" timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 \
        --steps 24 --quant fp8 --max-model-len 8192 --timeline "$OUT/timeline_fp8_$v.json" \
        > "$OUT/timeline_fp8_$v.log" 2>&1
    note "timeline fp8 $var=$v: $(grep wall_ms "$OUT/timeline_fp8_$v.log" | cut -c1-60)"
    grep -E "$pattern" "$OUT/timeline_fp8_$v.log" | tee -a "$SUMMARY"
  done
  for d in "$@"; do
    q=""; [ "$d" = fp8 ] && q="--quant fp8"
    (export "$var=$off"; bench "${d}_b1_off" $m $q $b)
    (export "$var=$on"; bench "${d}_b1_on" $m $q $b)
  done
}

fp8_variant() {  # fp8_variant TAG LABEL PATTERN: in the current environment, an FP8
  # batch-1 timeline (its lines matching PATTERN kept in the summary) and TPOT (s17 phases)
  local tag=$1 label=$2 pattern=$3
  timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
      --quant fp8 --max-model-len 8192 --timeline "$OUT/timeline_$tag.json" \
      > "$OUT/timeline_$tag.log" 2>&1
  note "variant $tag ($label): $(grep wall_ms "$OUT/timeline_$tag.log" | cut -c1-60)"
  grep -E "$pattern" "$OUT/timeline_$tag.log" | head -9 | tee -a "$SUMMARY"
  bench fp8_b1_v$tag llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 \
      --num-requests 1 --input-len 128 --output-len 256
}

amax_sweep() {  # amax_sweep SET: one batch-1 FP8 timeline per handoff tile variant of
  # scripts/amax_variants.py SET, then the fastest benched against v0 and bf16
  python3 scripts/amax_variants.py write "$OUT/var" "$1" | tee -a "$SUMMARY"
  for v in 0 1 2 3 4 5; do
    TRTDIST_FP8_GEMM_CONFIGS="$OUT/var/v$v.json" timeout 120 python3 \
        scripts/profile_decode.py --batch 1 --context 128 --steps 24 --quant fp8 \
        --max-model-len 8192 --timeline "$OUT/var/timeline_v$v.json" \
        > "$OUT/var/timeline_v$v.log" 2>&1
    note "v$v $(grep wall_ms "$OUT/var/timeline_v$v.log" | cut -c1-60) \
$(grep "^linear" "$OUT/var/timeline_v$v.log") \
$(grep -E "^_(quant_fp8|silu_and_mul|silu_mul_quant|decode_reduce)" "$OUT/var/timeline_v$v.log" \
  | awk '{printf "%s %s  ", $1, $3}')"
  done
  local best; best=$(python3 scripts/amax_variants.py pick "$OUT/var"); note "best: $best"
  local m="llama3-8b --dummy-weights --dtype bfloat16"
  local b="--num-requests 1 --input-len 128 --output-len 256"
  TRTDIST_FP8_GEMM_CONFIGS="$OUT/var/v0.json" bench fp8_b1_v0 $m --quant fp8 $b
  TRTDIST_FP8_GEMM_CONFIGS="$OUT/var/$best.json" bench fp8_b1_best $m --quant fp8 $b
  bench b1 $m $b
}

decode_mlp_call() {  # decode_mlp_call TAG CONFIGS...: the (removed) decode MLP's GPU tests,
  # its microbench over CONFIGS, then batch 1 with the fastest against the separate kernels
  # and bf16 (phases s11c-s11g)
  local tag=$1; shift
  timeout 300 python3 -m pytest -q -rf -m gpu tests/test_fp8_decode_mlp.py 2>&1 \
      | tee "$OUT/${tag}_tests.log" | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
  note "$tag decode-mlp tests: $(tail -1 "$OUT/${tag}_tests.log")"
  timeout 300 python3 scripts/bench_decode_mlp.py --configs "$@" \
      --output "$OUT/decode_mlp.json" 2>&1 | tee "$OUT/decode_mlp.log" | tail -16 | tee -a "$SUMMARY"
  local best; best=$(python3 -c "import json; c = json.load(open('$OUT/decode_mlp.json'))['cases']; \
c.pop('separate'); print(min(c, key=lambda k: c[k]['us_per_layer']))")
  note "best config $best"
  local m="llama3-8b --dummy-weights --dtype bfloat16"
  local b="--num-requests 1 --input-len 128 --output-len 256"
  TRTDIST_FP8_DECODE_MLP_CONFIG=$best bench fp8_b1 $m --quant fp8 $b
  TRTDIST_FP8_DECODE_MLP=0 bench fp8_b1_sep $m --quant fp8 $b
  bench b1 $m $b
}

for phase in "$@"; do
  case $phase in
    kernels)
      python3 -m pytest -q -m gpu tests/test_triton_attention.py tests/test_fused_kernels.py \
          tests/test_kernels.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -15
      note "kernel tests: $(tail -1 "$OUT/kernel_tests.log")"
      timeout 600 python3 scripts/bench_kernels.py --output "$OUT/kernels.json" \
          2>&1 | tee "$OUT/bench_kernels.log" | tail -25
      timeout 300 python3 scripts/bench_fused_kernels.py --output "$OUT/fused.json" \
          2>&1 | tee "$OUT/bench_fused.log" | tail -25
      ;;
    attnbench)
      timeout 300 python3 scripts/bench_kernels.py --output "$OUT/kernels.json" \
          2>&1 | tee "$OUT/bench_kernels.log" | tail -20
      ;;
    attn)
      timeout ${ATTN_TIMEOUT:-400} python3 -m pytest -q -x -m gpu tests/test_triton_attention.py \
          ${ATTN_K:+-k "$ATTN_K"} 2>&1 | tee "$OUT/attn_tests.log" | tail -15
      note "attn tests: $(tail -1 "$OUT/attn_tests.log")"
      ;;
    profile)
      for bc in 1:128 256:256; do
        timeout 300 python3 scripts/profile_decode.py --batch ${bc%%:*} --context ${bc##*:} \
            --steps 32 --output "$OUT/profile_${bc%%:*}.json" > "$OUT/profile_${bc%%:*}.log" 2>&1
        note "profile b${bc%%:*}: $(tail -1 "$OUT/profile_${bc%%:*}.log")"
        grep -A16 "^kernel " "$OUT/profile_${bc%%:*}.log" | head -17
      done
      ;;
    fused)
      python3 -m pytest -q -m gpu tests/test_fused_kernels.py 2>&1 | tee "$OUT/fused_tests.log" | tail -8
      note "fused tests: $(tail -1 "$OUT/fused_tests.log")"
      timeout 300 python3 scripts/bench_fused_kernels.py --output "$OUT/fused.json" \
          2>&1 | tee "$OUT/bench_fused.log" | tail -25
      ;;
    equiv)
      python3 -m pytest -q -rs tests/test_equivalence.py tests/test_runtime.py tests/test_graphs.py \
          tests/test_inputs.py tests/test_overlap.py tests/test_sampler.py \
          tests/test_prompt_logprobs.py 2>&1 | tee "$OUT/equiv_tests.log" | tail -25
      note "equiv tests: $(tail -1 "$OUT/equiv_tests.log")"
      ;;
    quick)
      M="llama3-8b --dummy-weights --dtype bfloat16"
      bench b1eager $M --num-requests 1 --input-len 128 --output-len 64 --enforce-eager
      bench b1 $M --num-requests 1 --input-len 128 --output-len 256
      bench r256 $M --num-requests 256 --input-len 128 --output-len 64
      ;;
    model)
      python3 -m pytest -q -rs -m "gpu or not gpu" tests/test_graphs.py tests/test_equivalence.py \
          tests/test_runtime.py tests/test_kernels.py 2>&1 | tee "$OUT/model_tests.log" | tail -15
      note "model tests: $(tail -1 "$OUT/model_tests.log")"
      ;;
    bench)
      M="llama3-8b --dummy-weights --dtype bfloat16"
      bench b1 $M --num-requests 1 --input-len 128 --output-len 256
      bench r128 $M --num-requests 128 --input-len 128 --output-len 128
      bench r1024 $M --num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024
      bench ttft8k $M --num-requests 1 --input-len 8190 --output-len 2
      ;;
    step256)
      timeout 300 python3 scripts/profile_decode.py --batch 256 --context 256 --steps 32 \
          --output "$OUT/step256.json" > "$OUT/step256.log" 2>&1
      note "step b256 ctx256: $(tail -1 "$OUT/step256.log")"
      ;;
    long)
      M="llama3-8b --dummy-weights --dtype bfloat16"
      bench r1024x1000 $M --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024
      ;;
    fp8)
      python3 -m pytest -q -m gpu tests/test_fp8.py tests/test_fp8_kernels.py tests/test_fp8_fused.py \
          tests/test_sampler.py 2>&1 | tee "$OUT/fp8_tests.log" | tail -8
      note "fp8 tests: $(tail -1 "$OUT/fp8_tests.log")"
      timeout 200 python3 scripts/bench_fp8_gemm.py --quick --output "$OUT/fp8_gemm.json" \
          > "$OUT/fp8_gemm.log" 2>&1; tail -22 "$OUT/fp8_gemm.log"
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8"
      bench fp8_b1 $M --num-requests 1 --input-len 128 --output-len 256
      bench fp8_r1024 $M --num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024
      ;;
    fp8tune)
      # sweep the small-M FP8 GEMM's configs, then run the FP8 GPU tests and the batch-1
      # bench with the tuned table (TRTDIST_FP8_GEMM_CONFIGS); the table to paste is printed
      timeout ${TUNE_TIMEOUT:-260} python3 scripts/tune_fp8_gemm.py \
          --budget-s ${TUNE_BUDGET:-200} --output "$OUT/fp8_tune.json" > "$OUT/fp8_tune.log" 2>&1
      note "fp8 tune rc=$?"
      grep -E " M=[0-9]+ +[0-9.]+ us" "$OUT/fp8_tune.log" | tee -a "$SUMMARY"
      sed -n '/^TUNED/,/^}/p' "$OUT/fp8_tune.log"
      [ -s "$OUT/fp8_tune.json" ] && export TRTDIST_FP8_GEMM_CONFIGS="$OUT/fp8_tune.json"
      timeout 180 python3 -m pytest -q -m gpu tests/test_fp8_kernels.py tests/test_fp8_fused.py \
          tests/test_fp8.py 2>&1 | tee "$OUT/fp8tune_tests.log" | tail -8
      note "fp8 tests (tuned table): $(tail -1 "$OUT/fp8tune_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8"
      bench fp8tuned_b1 $M --num-requests 1 --input-len 128 --output-len 256
      ;;
    fp8long)
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8"
      bench fp8_r1024x1000 $M --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024
      ;;
    kvfp8)
      # FP8 KV cache: kernel tests (compiled), the engine against fake-quant transformers,
      # then the 1024 x 128/128 bench (compare with bench r1024 of the `bench` phase)
      timeout 900 python3 -m pytest -q -rs tests/test_kv_fp8.py 2>&1 \
          | tee "$OUT/kvfp8_tests.log" | tail -15
      note "kvfp8 tests: $(tail -1 "$OUT/kvfp8_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --kv-cache-dtype fp8"
      bench kvfp8_r1024 $M --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      ;;
    kvfp8long)
      # where the bf16 pool runs out (compare with bench r1024x1000 of the `long` phase)
      M="llama3-8b --dummy-weights --dtype bfloat16 --kv-cache-dtype fp8"
      bench kvfp8_r1024x1000 $M --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024
      ;;
    serve)
      # the server's web stack is not on the GPU machines: carried as wheels in .whl
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      timeout 500 python3 -m trtdist.cli bench serve llama3-8b --dummy-weights --dtype bfloat16 \
          --max-batch-size 512 --input-len 1024 --output-len 256 --num-prompts ${SERVE_N:-256} \
          --request-rate ${SERVE_RATES:-4,16,inf} --slo ttft=500ms,tpot=50ms --disable-tqdm \
          --mpirun "mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE -x PYTHONPATH" \
          --output "$OUT/serve.json" --plot-prefix "$OUT/serve" > "$OUT/serve.log" 2>&1
      note "bench serve rc=$?: $(tail -4 "$OUT/serve.log" | tr '\n' ' ')"
      ;;
    gemvtune)
      timeout 500 python3 scripts/tune_gemv.py --output "$OUT/gemv.json" 2>&1 \
          | tee "$OUT/tune_gemv.log" | grep -v WRONG | tail -25
      ;;
    gputests)  # the GPU tests of the kernels and paths changed lately
      python3 -m pytest -q -rs -m gpu tests/test_gemv.py tests/test_fp8.py \
          tests/test_fp8_kernels.py tests/test_sampler.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -12
      note "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
      ;;
    b1)
      bench b1 llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 --input-len 128 \
          --output-len 256
      ;;
    b1nogemv)  # A/B in one run: the same batch-1 bench with the GEMV table emptied
      cp kernels/gemv.py /tmp/gemv.py.bak
      python3 -c "import re,pathlib; p=pathlib.Path('kernels/gemv.py'); s=p.read_text(); \
p.write_text(s.replace('CONFIGS: dict[tuple[int, int, int], tuple[int, int, int]] = {', \
'CONFIGS: dict[tuple[int, int, int], tuple[int, int, int]] = {} and {'))"
      bench b1nogemv llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 \
          --input-len 128 --output-len 256
      cp /tmp/gemv.py.bak kernels/gemv.py
      ;;
    longgne)  # 1000 / 1000 without preemption (guaranteed_no_evict), bf16 and FP8 weights
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1024 --input-len 1000"
      bench r1024x1000gne $M --output-len 1000 --max-batch-size 1024 \
          --scheduler-policy guaranteed_no_evict
      bench fp8_r1024x1000gne $M --output-len 1000 --max-batch-size 1024 --quant fp8 \
          --scheduler-policy guaranteed_no_evict ${LONG_EXTRA:-}
      ;;
    fp8tests)  # the FP8 GPU tests, failures named
      timeout ${FP8_TEST_TIMEOUT:-300} python3 -m pytest -q -rf -m gpu ${FP8_K:+-k "$FP8_K"} tests/test_fp8.py \
          tests/test_fp8_kernels.py tests/test_fp8_fused.py 2>&1 | tee "$OUT/fp8_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "fp8 tests: $(tail -1 "$OUT/fp8_tests.log")"
      ;;
    fp8profile)
      timeout 300 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 32 \
          --quant fp8 --output "$OUT/profile_fp8_1.json" > "$OUT/profile_fp8_1.log" 2>&1
      note "profile fp8 b1: $(tail -1 "$OUT/profile_fp8_1.log")"
      grep -A22 "^kernel " "$OUT/profile_fp8_1.log" | head -23
      ;;
    thru)  # the throughput rows of BENCHMARKS.md, one call
      M="llama3-8b --dummy-weights --dtype bfloat16"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench b1 $M --num-requests 1 --input-len 128 --output-len 256
      bench fp8_b1 $M --quant fp8 --num-requests 1 --input-len 128 --output-len 256
      bench r1024 $M $R
      bench fp8_r1024 $M --quant fp8 $R
      bench fp8kv_r1024 $M --quant fp8 --kv-cache-dtype fp8 $R
      ;;
    long2)  # 1000 / 1000: bf16 as before and without preemption; FP8 weights + FP8 KV
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1024 --input-len 1000"
      M="$M --output-len 1000 --max-batch-size 1024"
      bench r1024x1000gne $M --scheduler-policy guaranteed_no_evict
      bench fp8kv_r1024x1000gne $M --quant fp8 --kv-cache-dtype fp8 \
          --scheduler-policy guaranteed_no_evict
      ;;
    long1)  # 1000 / 1000 bf16 with the default policy (preempts), for the same-run comparison
      bench r1024x1000 llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1024 \
          --input-len 1000 --output-len 1000 --max-batch-size 1024
      ;;
    profile1024)
      timeout 300 python3 scripts/profile_decode.py --batch 1024 --context 128 --steps 16 \
          --output "$OUT/profile_1024.json" > "$OUT/profile_1024.log" 2>&1
      note "profile b1024: $(tail -1 "$OUT/profile_1024.log")"
      sed -n '/ncalls/,+14p' "$OUT/profile_1024.log"; grep -A12 "^kernel " "$OUT/profile_1024.log"
      ;;
    fp8long3)
      bench fp8_r1024x1000gne llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 \
          --num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024 \
          --scheduler-policy guaranteed_no_evict
      ;;
    fp8gemv)  # M = 1: gemv tiles over the whole of K, then tests and batch 1 with that table
      timeout 200 python3 scripts/tune_fp8_gemm.py --m 1 --gemv-only --budget-s 150 \
          --output "$OUT/fp8_gemv.json" > "$OUT/fp8_gemv.log" 2>&1
      note "fp8 gemv tune rc=$?"
      grep -E " M=[0-9]+ +[0-9.]+ us" "$OUT/fp8_gemv.log" | tee -a "$SUMMARY"
      [ -s "$OUT/fp8_gemv.json" ] && export TRTDIST_FP8_GEMM_CONFIGS="$OUT/fp8_gemv.json"
      timeout 200 python3 -m pytest -q -rf -m gpu tests/test_fp8_kernels.py tests/test_fp8_fused.py \
          -k "split_k_and_dot or capture_replay or mlp_fused or small_m" 2>&1 \
          | tee "$OUT/fp8gemv_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-200
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 --input-len 128"
      bench fp8gemv_b1 $M --output-len 256 --quant fp8
      unset TRTDIST_FP8_GEMM_CONFIGS
      bench b1 $M --output-len 256
      ;;
    kvfinal)  # FP8 KV with the key rotation and the register-converted V: tests, then benches
      timeout 300 python3 -m pytest -q -rf -m gpu tests/test_kv_fp8.py -k "gpu" 2>&1 \
          | tee "$OUT/kvfinal_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "kv fp8 gpu tests: $(tail -1 "$OUT/kvfinal_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1024 --input-len 1000"
      bench fp8kv_r1024x1000gne $M --output-len 1000 --max-batch-size 1024 --quant fp8 \
          --kv-cache-dtype fp8 --scheduler-policy guaranteed_no_evict
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench fp8kv_r1024 llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 \
          --kv-cache-dtype fp8 $R
      ;;
    kvwrite)  # the FP8 cache write kernel (RoPE + key rotation + quantization) on the GPU
      timeout 200 python3 -m pytest -q -rf -m gpu tests/test_kv_fp8.py -k "gpu_write" 2>&1 \
          | tee "$OUT/kvwrite_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "kv fp8 write gpu tests: $(tail -1 "$OUT/kvwrite_tests.log")"
      ;;
    mnt)  # 1024 x 128/128 bf16: default chunk budget against --max-num-tokens 32768, one run
      M="llama3-8b --dummy-weights --dtype bfloat16"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench r1024 $M $R
      bench r1024_mnt32k $M $R --max-num-tokens 32768
      bench r1024_mnt16k $M $R --max-num-tokens 16384
      ;;
    diag1)  # 1000 / 1000 where the time goes: decode step profiles at b512 x 1536, default policy
      for q in "fp8 fp8" "none auto"; do
        read -r qq kv <<< "$q"
        timeout 300 python3 scripts/profile_decode.py --batch 512 --context 1536 --steps 8 \
            --quant $qq --kv-cache-dtype $kv --output "$OUT/profile_${qq}.json" \
            > "$OUT/profile_${qq}.log" 2>&1
        note "profile b512 c1536 quant=$qq kv=$kv: $(tail -1 "$OUT/profile_${qq}.log")"
        grep -A15 "^kernel " "$OUT/profile_${qq}.log" | tee -a "$SUMMARY"
        grep -B2 -A14 "ncalls" "$OUT/profile_${qq}.log" | head -18
      done
      bench fp8kv_r1024x1000 llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 \
          --kv-cache-dtype fp8 --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024
      ;;
    ncu1)  # hardware counters of the decode kernel, bf16 against FP8 cache, b64 x 4k
      which ncu || ls /opt/nvidia/nsight-compute/*/ncu
      NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
      for c in "decode b64 ctx4096 fp8" "decode b64 ctx4096"; do
        tag=$(echo "$c" | tr ' ' _)
        timeout 240 $NCU --clock-control none -k regex:_decode_partial --launch-skip 5 -c 1 \
            --section SpeedOfLight --section Occupancy --section LaunchStats \
            --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
            --section InstructionStats --section ComputeWorkloadAnalysis \
            python3 scripts/bench_kernels.py --only "$c" > "$OUT/ncu_$tag.log" 2>&1
        note "ncu $c rc=$?"
        grep -E "Duration|Throughput|Issue|Stall|Occupancy|Registers|Shared Memory Config|Executed Ipc|Eligible|No Eligible|Active Warps|Block Limit|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Executed Instructions " \
            "$OUT/ncu_$tag.log" | head -45 | tee -a "$SUMMARY"
      done
      ;;
    sweep1)  # FP8-cache prefill launch configs (the decode sweep is in phase vt)
      cp kernels/triton_attention.py /tmp/ta.py.bak
      for v in "128 64 8 3" "128 64 8 2" "128 128 8 2" "64 64 4 3" "128 32 4 3"; do
        read -r bm bn w st <<< "$v"
        cp /tmp/ta.py.bak kernels/triton_attention.py
        sed -i "s/        return 128, 64, 8, 3/        return $bm, $bn, $w, $st/" kernels/triton_attention.py
        timeout 120 python3 scripts/bench_kernels.py --only "prefill causal 8192 fp8" \
            --output "$OUT/p_${bm}_${bn}_${w}_$st.json" > "$OUT/p_${bm}_${bn}_${w}_$st.log" 2>&1
        grep -E "fp8" "$OUT/p_${bm}_${bn}_${w}_$st.log" | sed "s/^/prefill $bm $bn $w $st: /" | tee -a "$SUMMARY"
      done
      cp /tmp/ta.py.bak kernels/triton_attention.py
      grep -E "copy|matmul" "$OUT/p_128_64_8_3.log" | head -3
      ;;
    vt)  # token-minor FP8 V: GPU tests, decode / prefill config sweep, step profile, 1000/1000
      timeout 330 python3 -m pytest -q -rf -m gpu tests/test_kv_fp8.py tests/test_triton_attention.py \
          -x -k "gpu and not long_context" 2>&1 | tee "$OUT/vt_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "vt gpu tests: $(tail -1 "$OUT/vt_tests.log")"
      cp kernels/triton_attention.py /tmp/ta.py.bak
      for v in "128 4 3" "128 4 2" "128 4 4" "64 4 2"; do
        read -r bn w st <<< "$v"
        cp /tmp/ta.py.bak kernels/triton_attention.py
        sed -i "s/    return (128, 4, 3) if kv_fp8 else (64, 4, 2)/    return ($bn, $w, $st) if kv_fp8 else (64, 4, 2)/" \
            kernels/triton_attention.py
        timeout 120 python3 scripts/bench_kernels.py --only "fp8 KV" --output "$OUT/d_${bn}_${w}_$st.json" \
            > "$OUT/d_${bn}_${w}_$st.log" 2>&1
        grep -E "fp8" "$OUT/d_${bn}_${w}_$st.log" | sed "s/^/BN $bn W $w S $st: /" | tee -a "$SUMMARY"
      done
      cp /tmp/ta.py.bak kernels/triton_attention.py
      grep -E "copy|matmul" "$OUT/d_128_4_3.log" | head -3 | tee -a "$SUMMARY"
      timeout 200 python3 scripts/profile_decode.py --batch 256 --context 1024 --steps 64 \
          --quant fp8 --kv-cache-dtype fp8 --output "$OUT/profile_vt.json" > "$OUT/profile_vt.log" 2>&1
      note "profile b256 c1024 fp8/fp8: $(tail -1 "$OUT/profile_vt.log")"
      grep -A12 "^kernel " "$OUT/profile_vt.log" | tee -a "$SUMMARY"
      bench fp8kv_r1024x1000 llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 \
          --kv-cache-dtype fp8 --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024
      ;;
    vt2)  # token-minor FP8 V with the one-pass FP8 prefill: GPU tests, kernels, engine benches
      timeout 260 python3 -m pytest -q -rf -m gpu -n 4 tests/test_kv_fp8.py tests/test_triton_attention.py \
          tests/test_fused_kernels.py -k "gpu and not long_context" 2>&1 | tee "$OUT/vt2_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "vt2 gpu tests: $(tail -1 "$OUT/vt2_tests.log")"
      timeout 120 python3 scripts/bench_kernels.py --only "fp8 KV" --output "$OUT/kernels_fp8.json" \
          > "$OUT/kernels_fp8.log" 2>&1
      grep -E "fp8|copy|matmul" "$OUT/kernels_fp8.log" | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      bench fp8kv_r1024x1000 $M --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024
      bench fp8kv_r1024 $M --num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024
      ;;
    final)  # the GPU tests of the changed kernels, then the throughput rows of the closing note
      timeout 240 python3 -m pytest -q -rf -m gpu -n 4 tests/test_kv_fp8.py tests/test_triton_attention.py \
          tests/test_fused_kernels.py -k "gpu and not long_context" 2>&1 | tee "$OUT/final_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "final gpu tests: $(tail -1 "$OUT/final_tests.log")"
      timeout 120 python3 -m pytest -q -rf -m gpu tests/test_triton_attention.py -k "long_context" 2>&1 \
          | tail -1 | sed "s/^/long-context tests: /" | tee -a "$SUMMARY"
      ;;
    pdl)  # what programmatic dependent launch saves in a graph of batch-1-shaped kernels
      timeout 300 python3 scripts/bench_pdl.py --output "$OUT/pdl.json" 2>&1 | tee "$OUT/pdl.log" \
          | tail -10
      tail -9 "$OUT/pdl.log" >> "$SUMMARY"
      ;;
    b1pair)  # batch 1, bf16 and FP8, one call
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 --input-len 128"
      bench b1 $M --output-len 256
      bench fp8_b1 $M --output-len 256 --quant fp8
      ;;
    pdl2)  # PDL + rows split over programs: GPU tests, then batch 1 with each off (A/B)
      timeout 300 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_fused.py \
          tests/test_fp8_kernels.py tests/test_gemv.py tests/test_fused_kernels.py \
          tests/test_kernels.py 2>&1 | tee "$OUT/pdl_tests.log" | grep -E "^FAILED|passed|failed" \
          | cut -c1-300
      note "pdl kernel tests: $(tail -1 "$OUT/pdl_tests.log")"
      timeout 300 python3 -m pytest -q -rf -m gpu tests/test_graphs.py tests/test_equivalence.py \
          tests/test_fp8.py 2>&1 | tee "$OUT/pdl_model_tests.log" | grep -E "^FAILED|passed|failed" \
          | cut -c1-300
      note "pdl model tests: $(tail -1 "$OUT/pdl_model_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 --input-len 128 --output-len 256"
      bench b1 $M
      bench fp8_b1 $M --quant fp8
      TRTDIST_PDL=0 bench fp8_b1_nopdl $M --quant fp8
      TRTDIST_ROW_SPLIT=0 bench fp8_b1_nosplit $M --quant fp8
      TRTDIST_PDL=0 bench b1_nopdl $M
      ;;
    pdl3)  # late PDL trigger + one-atomic row barrier: tests, batch-1 A/B, split profile
      timeout 300 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_fused.py \
          tests/test_fp8_kernels.py tests/test_gemv.py 2>&1 | tee "$OUT/pdl_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "pdl kernel tests: $(tail -1 "$OUT/pdl_tests.log")"
      timeout 300 python3 -m pytest -q -rf -m gpu tests/test_graphs.py tests/test_equivalence.py \
          2>&1 | tee "$OUT/pdl_model_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "pdl model tests: $(tail -1 "$OUT/pdl_model_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8
      TRTDIST_ROW_SPLIT=0 bench fp8_b1_pdlonly $M --quant fp8
      TRTDIST_PDL=0 bench fp8_b1_splitonly $M --quant fp8
      TRTDIST_PDL=0 TRTDIST_ROW_SPLIT=0 bench fp8_b1_neither $M --quant fp8
      bench b1 $M
      TRTDIST_PDL=0 bench b1_nopdl $M
      TRTDIST_PDL=0 timeout 300 python3 scripts/profile_decode.py --batch 1 --context 128 \
          --steps 32 --quant fp8 --output "$OUT/profile_split.json" > "$OUT/profile_split.log" 2>&1
      grep -A14 "^kernel " "$OUT/profile_split.log" | tee -a "$SUMMARY"
      ;;
    pdl4)  # which FP8 kernels gain or lose with PDL (TRTDIST_PDL_OFF kinds), batch 1
      timeout 300 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_fused.py \
          tests/test_fp8_kernels.py tests/test_gemv.py 2>&1 | tee "$OUT/pdl_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "pdl kernel tests: $(tail -1 "$OUT/pdl_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 --input-len 128 --output-len 256 --quant fp8"
      bench fp8_b1_all $M
      TRTDIST_PDL_OFF=fp8_gemm bench fp8_b1_off_gemm $M
      TRTDIST_PDL_OFF=fp8_row bench fp8_b1_off_row $M
      TRTDIST_PDL_OFF=fp8_gemm_prefetch bench fp8_b1_off_prefetch $M
      TRTDIST_PDL_OFF=fp8_gemm,fp8_row bench fp8_b1_off_both $M
      TRTDIST_PDL_OFF=attention,rotary bench fp8_b1_off_attn $M
      TRTDIST_PDL=0 bench fp8_b1_nopdl $M
      ;;
    pdl5)  # first-tile prefetch under PDL, decode chunk for small batches, bf16 both ways
      timeout 300 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_kernels.py \
          tests/test_gemv.py 2>&1 | tee "$OUT/pdl_tests.log" | grep -E "^FAILED|passed|failed" \
          | cut -c1-300
      note "pdl kernel tests: $(tail -1 "$OUT/pdl_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1_peel $M --quant fp8
      TRTDIST_PDL_OFF=fp8_gemm_prefetch bench fp8_b1_nopf $M --quant fp8
      TRTDIST_DECODE_MIN_CHUNK=64 bench fp8_b1_peel_c64 $M --quant fp8
      TRTDIST_DECODE_MIN_CHUNK=128 bench fp8_b1_peel_c128 $M --quant fp8
      bench b1_pf $M
      TRTDIST_PDL_OFF=gemv_prefetch bench b1_nopf $M
      TRTDIST_DECODE_MIN_CHUNK=64 bench b1_pf_c64 $M
      ;;
    final2)  # PDL + split SiLU rows: GPU tests of every kernel and the model, then the rows
      timeout 420 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_fused.py \
          tests/test_fp8_kernels.py tests/test_gemv.py tests/test_fused_kernels.py \
          tests/test_kernels.py tests/test_kv_fp8.py tests/test_triton_attention.py \
          tests/test_sampler.py -k "not long_context" 2>&1 | tee "$OUT/final_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "final gpu kernel tests: $(tail -1 "$OUT/final_tests.log")"
      timeout 300 python3 -m pytest -q -rf -m gpu tests/test_graphs.py tests/test_equivalence.py \
          tests/test_fp8.py tests/test_runtime.py tests/test_overlap.py 2>&1 \
          | tee "$OUT/final_model_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "final gpu model tests: $(tail -1 "$OUT/final_model_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench b1 $M --num-requests 1 --input-len 128 --output-len 256
      bench fp8_b1 $M --quant fp8 --num-requests 1 --input-len 128 --output-len 256
      TRTDIST_PDL=0 bench fp8_b1_nopdl $M --quant fp8 --num-requests 1 --input-len 128 \
          --output-len 256
      bench fp8_r1024 $M --quant fp8 $R
      bench fp8kv_r1024 $M --quant fp8 --kv-cache-dtype fp8 $R
      bench fp8kv_r1024x1000 $M --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024 --quant fp8 --kv-cache-dtype fp8
      ;;
    long4)  # 1000 / 1000 FP8 + FP8 KV: 32-token pages, a larger step budget, more KV memory
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      L="--num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024"
      bench fp8kv_long_bs32 $M $L --block-size 32
      bench fp8kv_long_mnt16k $M $L --max-num-tokens 16384
      bench fp8kv_long_f95 $M $L --kv-cache-fraction 0.95
      ;;
    long5)  # FP8 caches default to 32-token blocks: 128/128 and 1000/1000, and with more KV memory
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      L="--num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024"
      bench fp8kv_r1024 $M --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      bench fp8kv_long $M $L
      bench fp8kv_long_f95 $M $L --kv-cache-fraction 0.95
      ;;
    bs128)  # 1024 x 128/128 FP8 + FP8 KV: 32-token blocks (cold, then warm Triton cache), 16
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench fp8kv_r1024_bs32a $M $R
      bench fp8kv_r1024_bs16 $M $R --block-size 16
      bench fp8kv_r1024_bs32b $M $R
      ;;
    dsweep)  # FP8-cache decode kernel configs against 16- and 32-token pages
      timeout 400 python3 scripts/sweep_fp8_decode.py --output "$OUT/dsweep.json" 2>&1 \
          | tee "$OUT/dsweep.log" | grep -v Warning | tail -40
      tail -37 "$OUT/dsweep.log" >> "$SUMMARY"
      ;;
    bs64)  # 64-token FP8 pages: kernel sweep, then 128/128 and 1000/1000 with --block-size 64
      timeout 200 python3 scripts/sweep_fp8_decode.py --block-sizes 32,64 \
          --configs 128:4:3,128:4:4,256:4:3 --output "$OUT/dsweep64.json" 2>&1 \
          | grep -v Warning | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      bench fp8kv_r1024_bs32 $M --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      bench fp8kv_r1024_bs64 $M --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024 --block-size 64
      bench fp8kv_long_bs64 $M --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024 --block-size 64
      ;;
    bs64b)  # 32 against 64-token FP8 pages after a warm-up bench; 1000/1000 with 64 and 0.95
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench warmup $M $R
      bench fp8kv_r1024_bs64 $M $R --block-size 64
      bench fp8kv_r1024_bs32 $M $R
      bench fp8kv_long_bs64_f95 $M --num-requests 1024 --input-len 1000 --output-len 1000 \
          --max-batch-size 1024 --block-size 64 --kv-cache-fraction 0.95
      ;;
    final3)  # after the FP8-cache block-size default: the FP8 / FP8 KV GPU tests and the model's
      timeout 400 python3 -m pytest -q -rf -m gpu -n 4 tests/test_kv_fp8.py tests/test_fp8.py \
          tests/test_fp8_fused.py tests/test_graphs.py tests/test_equivalence.py \
          -k "not long_context" 2>&1 | tee "$OUT/final3_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "final3 gpu tests: $(tail -1 "$OUT/final3_tests.log")"
      ;;
    prof1024)  # where a 1000/1000 decode step goes: b1024 x 1536, FP8 weights + FP8 KV
      timeout 400 python3 scripts/profile_decode.py --batch 1024 --context 1536 --steps 8 \
          --quant fp8 --kv-cache-dtype fp8 --output "$OUT/profile_1024.json" \
          > "$OUT/profile_1024.log" 2>&1
      note "profile b1024 c1536 fp8/fp8: $(tail -1 "$OUT/profile_1024.log")"
      grep -A20 "^kernel " "$OUT/profile_1024.log" | tee -a "$SUMMARY"
      ;;
    rowsweep)  # row kernels' launch configs against token count (decode batches, prefill)
      timeout 500 python3 scripts/sweep_row_kernels.py --tokens ${ROW_TOKENS:-1,64,1024,8192} \
          --output "$OUT/rows.json" > "$OUT/rows.log" 2>&1
      note "rowsweep rc=$?"; sed -n '/best per kernel/,$p' "$OUT/rows.log" | tee -a "$SUMMARY"
      ;;
    graphfix)  # decode graphs at --max-batch-size 1024 (one static output): tests, then benches
      timeout 400 python3 -m pytest -q -rf -m gpu tests/test_graphs.py \
          2>&1 | tee "$OUT/graphfix_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "graphfix gpu tests: $(tail -1 "$OUT/graphfix_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench warm $M --quant fp8 --num-requests 64 --input-len 128 --output-len 32
      bench fp8_r1024 $M --quant fp8 $R
      bench fp8kv_r1024 $M --quant fp8 --kv-cache-dtype fp8 $R
      bench bf16_r1024 $M $R
      bench fp8kv_long $M --quant fp8 --kv-cache-dtype fp8 --num-requests 1024 \
          --input-len 1000 --output-len 1000 --max-batch-size 1024
      ;;
    round1)  # hardware E4M3 rounding on the GPU: bit-exact tests, row kernels, 1000 / 1000
      timeout 400 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_fused.py \
          tests/test_fp8_kernels.py tests/test_kv_fp8.py -k "not long_context" 2>&1 \
          | tee "$OUT/round1_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "round1 gpu tests: $(tail -1 "$OUT/round1_tests.log")"
      timeout 300 python3 scripts/sweep_row_kernels.py --tokens 1024,8192 \
          --output "$OUT/rows.json" > "$OUT/rows.log" 2>&1
      sed -n '/best per kernel/,$p' "$OUT/rows.log" | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      L="--num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024"
      bench warm $M --num-requests 64 --input-len 128 --output-len 32
      bench fp8kv_long $M $L
      bench fp8kv_long_mnt16k $M $L --max-num-tokens 16384
      ;;
    final4a)  # after the graph-output fix: the model's GPU tests, then batch 1 and 128 / 128 rows
      timeout 420 python3 -m pytest -q -rf -m gpu -n 4 tests/test_graphs.py \
          tests/test_equivalence.py tests/test_runtime.py tests/test_fp8.py tests/test_overlap.py \
          tests/test_sampler.py tests/test_inputs.py -k "not long_context" 2>&1 \
          | tee "$OUT/final4_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "final4 gpu tests: $(tail -1 "$OUT/final4_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench warm $M --quant fp8 --num-requests 64 --input-len 128 --output-len 32
      bench b1 $M $B
      bench fp8_b1 $M --quant fp8 $B
      bench r1024 $M $R
      bench fp8_r1024 $M --quant fp8 $R
      bench fp8kv_r1024 $M --quant fp8 --kv-cache-dtype fp8 $R
      ;;
    final4b)  # 1024 x 1000 / 1000, FP8 weights + FP8 KV, defaults: two runs
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      L="--num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024"
      bench warm $M --num-requests 64 --input-len 128 --output-len 32
      bench fp8kv_long_a $M $L
      bench fp8kv_long_b $M $L
      ;;
    final4c)  # every GPU test of the kernels and the model at the session's last code
      timeout 560 python3 -m pytest -q -rf -m gpu -n 4 tests/test_triton_attention.py \
          tests/test_fused_kernels.py tests/test_kernels.py tests/test_gemv.py \
          tests/test_fp8_fused.py tests/test_fp8_kernels.py tests/test_kv_fp8.py tests/test_graphs.py \
          tests/test_equivalence.py tests/test_fp8.py tests/test_sampler.py -k "not long_context" \
          2>&1 | tee "$OUT/final4c_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "final4c gpu tests: $(tail -1 "$OUT/final4c_tests.log")"
      ;;
    review)  # after the launch-config signature cleanup: the row kernels' GPU tests, a short bench
      timeout 400 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_fused.py \
          tests/test_fused_kernels.py tests/test_kv_fp8.py -k "not long_context" 2>&1 \
          | tee "$OUT/review_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "review gpu tests: $(tail -1 "$OUT/review_tests.log")"
      bench fp8kv_r256 llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 \
          --kv-cache-dtype fp8 --num-requests 256 --input-len 128 --output-len 64
      ;;
    tl1)  # batch-1 decode: each kernel's critical-path share (end - previous end), FP8 and bf16
      for q in fp8 none; do
        timeout 300 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 16 \
            --quant $q --timeline "$OUT/timeline_$q.json" > "$OUT/timeline_$q.log" 2>&1
        note "timeline $q: $(tail -1 "$OUT/timeline_$q.log")"
        sed -n '/^timeline:/,/^kernel /p' "$OUT/timeline_$q.log" | head -75 | tee -a "$SUMMARY"
      done
      ;;
    tl2)  # batch-1 timelines at the bench's max_model_len: FP8 gemv tile variants, then bf16
      python3 scripts/gemv_variants.py "$OUT/variants" | tee -a "$SUMMARY"
      for v in 0 1 2 3 4; do
        TRTDIST_FP8_GEMM_CONFIGS="$OUT/variants/v$v.json" timeout 300 python3 \
            scripts/profile_decode.py --batch 1 --context 128 --steps 16 --quant fp8 \
            --max-model-len 8192 --timeline "$OUT/tl_fp8_v$v.json" > "$OUT/tl_fp8_v$v.log" 2>&1
        note "fp8 v$v: $(grep '^linear layers' "$OUT/tl_fp8_v$v.log") $(tail -1 "$OUT/tl_fp8_v$v.log" | cut -c1-90)"
      done
      timeout 300 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 16 \
          --max-model-len 8192 --timeline "$OUT/tl_bf16.json" > "$OUT/tl_bf16.log" 2>&1
      note "bf16: $(grep '^linear layers' "$OUT/tl_bf16.log") $(tail -1 "$OUT/tl_bf16.log" | cut -c1-90)"
      sed -n '/^timeline:/,/^one step/p' "$OUT/tl_fp8_v0.log" | head -24 | tee -a "$SUMMARY"
      ;;
    s7a)  # merged decode split, one-launch greedy / fed-back ids, side-stream result copy
      timeout 330 python3 -m pytest -q -rf -m gpu -n 4 tests/test_triton_attention.py \
          tests/test_kv_fp8.py tests/test_sampling_kernels.py tests/test_sampler.py \
          tests/test_graphs.py tests/test_overlap.py -k "not long_context" 2>&1 \
          | tee "$OUT/s7a_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s7a gpu tests: $(tail -1 "$OUT/s7a_tests.log")"
      for q in fp8 none; do
        timeout 200 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 16 \
            --quant $q --max-model-len 8192 --timeline "$OUT/tl_$q.json" > "$OUT/tl_$q.log" 2>&1
        note "timeline $q: $(grep '^linear layers' "$OUT/tl_$q.log") $(tail -1 "$OUT/tl_$q.log" | cut -c1-100)"
        sed -n '/^timeline:/,/^one step/p' "$OUT/tl_$q.log" | head -22 | tee -a "$SUMMARY"
      done
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench b1 $M $B
      bench fp8_b1 $M --quant fp8 $B
      ;;
    s7b)  # (measured with the o-projection quantize in the split's merge, since reverted)
      timeout 300 python3 -m pytest -q -rf -m gpu -n 4 tests/test_triton_attention.py \
          tests/test_fp8.py tests/test_graphs.py tests/test_equivalence.py tests/test_fp8_fused.py \
          tests/test_sampling_kernels.py -k "not long_context" 2>&1 \
          | tee "$OUT/s7b_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s7b gpu tests: $(tail -1 "$OUT/s7b_tests.log")"
      timeout 200 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 16 \
          --quant fp8 --max-model-len 8192 --timeline "$OUT/tl_fp8.json" > "$OUT/tl_fp8.log" 2>&1
      note "timeline fp8: $(grep '^linear layers' "$OUT/tl_fp8.log") $(tail -1 "$OUT/tl_fp8.log" | cut -c1-100)"
      sed -n '/^timeline:/,/^one step/p' "$OUT/tl_fp8.log" | head -20 | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      R="--num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024"
      bench b1 $M $B
      bench fp8_b1 $M --quant fp8 $B
      bench fp8_r1024 $M --quant fp8 $R
      ;;
    x2)  # two GPUs: the multi-rank GPU tests (TP / PP graphs, sampling, FP8), then batch 1
      timeout 470 python3 -m pytest -v -rf -m mpi tests/test_graphs.py tests/test_runtime.py \
          tests/test_fp8.py tests/test_kv_fp8.py tests/test_equivalence.py \
          -k "(2-1 or 1-2 or deadlock or seeded or prefix_reuse or guaranteed) and not 4-1 and not 2-2" \
          2>&1 | tee "$OUT/x2_tests.log" | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" \
          | sed 's/^tests\///' | cut -c1-150
      note "x2 gpu tests: $(tail -1 "$OUT/x2_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      CUDA_VISIBLE_DEVICES=0 bench b1 $M $B
      CUDA_VISIBLE_DEVICES=0 bench fp8_b1 $M --quant fp8 $B
      ;;
    final7)  # the session's last code, one GPU: the tests of the paths it changed
      timeout 480 python3 -m pytest -q -rf -m gpu -n 4 tests/test_sampling_kernels.py \
          tests/test_sampler.py tests/test_graphs.py tests/test_overlap.py tests/test_inputs.py \
          tests/test_equivalence.py tests/test_fp8.py tests/test_triton_attention.py \
          -k "not long_context" 2>&1 | tee "$OUT/final7_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "final7 gpu tests: $(tail -1 "$OUT/final7_tests.log")"
      ;;
    review7)  # after the review's _share_sampled simplification: overlap / sampler / graphs
      timeout 300 python3 -m pytest -q -rf -m gpu -n 4 tests/test_overlap.py tests/test_sampler.py \
          tests/test_graphs.py tests/test_sampling_kernels.py tests/test_equivalence.py \
          -k "not long_context" 2>&1 | tee "$OUT/review7_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "review7 gpu tests: $(tail -1 "$OUT/review7_tests.log")"
      bench fp8_b1 llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --num-requests 1 \
          --input-len 128 --output-len 256
      ;;
    s8a)  # the row-amax handoff (eighth session): correct first, then batch 1 A/B in one run
      timeout 240 python3 -m pytest -q -rf -m gpu -n 4 tests/test_row_amax.py \
          tests/test_fp8_kernels.py tests/test_fp8_fused.py 2>&1 | tee "$OUT/s8a_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s8a gpu tests: $(tail -1 "$OUT/s8a_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      TRTDIST_FP8_ROW_AMAX=0 bench fp8_b1_off $M --quant fp8 $B
      bench fp8_b1_on $M --quant fp8 $B
      bench b1 $M $B
      timeout 200 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 16 \
          --quant fp8 --max-model-len 8192 --timeline "$OUT/timeline_fp8.json" \
          > "$OUT/timeline_fp8.log" 2>&1
      note "timeline fp8: $(tail -1 "$OUT/timeline_fp8.log")"
      sed -n '/^timeline:/,/^kernel /p' "$OUT/timeline_fp8.log" | head -40 | tee -a "$SUMMARY"
      ;;
    s8b)  # row-amax handoff tiles in place (one timeline each), then the best against none
      timeout 150 python3 -m pytest -q -rf -m gpu -n 4 tests/test_row_amax.py 2>&1 \
          | tee "$OUT/s8b_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s8b gpu tests: $(tail -1 "$OUT/s8b_tests.log")"
      amax_sweep 1
      ;;
    s8c)  # the session's last code, one GPU: the tests of the paths it changed
      timeout 540 python3 -m pytest -q -rf -n 4 tests/test_row_amax.py 2>&1 \
          | tee "$OUT/s8c_amax.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s8c row-amax tests (all, on the GPU): $(tail -1 "$OUT/s8c_amax.log")"
      timeout 480 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_kernels.py \
          tests/test_fp8_fused.py tests/test_fp8.py tests/test_kv_fp8.py tests/test_graphs.py \
          tests/test_equivalence.py tests/test_triton_attention.py tests/test_kernels.py \
          -k "not long_context" 2>&1 | tee "$OUT/s8c_tests.log" \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s8c gpu tests: $(tail -1 "$OUT/s8c_tests.log")"
      ;;
    s8f)  # handoff tiles, second set (from the shipped ones): timelines, then the best benched
      amax_sweep 2
      ;;
    s8r)  # after the review's helper refactor (row-amax slot checks, E4M3 saturate): the
      # kernels it touched, then batch 1
      timeout 330 python3 -m pytest -q -rf -n 4 -m gpu tests/test_row_amax.py \
          tests/test_kv_fp8.py tests/test_fp8_kernels.py tests/test_fp8_fused.py \
          tests/test_kernels.py tests/test_triton_attention.py 2>&1 \
          | tee "$OUT/s8r_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      timeout 200 python3 -m pytest -q -rf tests/test_row_amax.py -k stage 2>&1 \
          | tee "$OUT/s8r_stage.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s8r gpu tests: $(tail -1 "$OUT/s8r_tests.log"); stage: $(tail -1 "$OUT/s8r_stage.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench b1 $M $B
      ;;
    s8e)  # after the KV writer's formula fix: the FP8 KV cache and handoff tests again
      timeout 270 python3 -m pytest -q -rf -n 4 tests/test_row_amax.py tests/test_kv_fp8.py \
          tests/test_fp8.py -m "gpu or not gpu" -k "not long_context" 2>&1 \
          | tee "$OUT/s8e_tests.log" | grep -E "^FAILED|passed|failed" | cut -c1-300
      note "s8e tests (on the GPU): $(tail -1 "$OUT/s8e_tests.log")"
      ;;
    s8d)  # the session's last code: batch 1 (handoff on / off, bf16) and 1024 x 128 / 128 FP8
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_FP8_ROW_AMAX=0 bench fp8_b1_off $M --quant fp8 $B
      bench b1 $M $B
      bench fp8_r1024 $M --quant fp8 --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      ;;
    s10a)  # the one-token CUDA FP8 GEMV (tensor cores, NVRTC): tests, microbench, batch 1
      python3 -c "import cuda.bindings as c, cuda.bindings.nvrtc as n; \
print('cuda.bindings', c.__version__, 'nvrtc', n.nvrtcVersion()[1:])" 2>&1 | tee -a "$SUMMARY"
      timeout 240 python3 -m pytest -q -rf -m gpu tests/test_fp8_gemv_cuda.py 2>&1 \
          | tee "$OUT/s10a_tests.log" | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -30
      note "s10a gemv tests: $(tail -1 "$OUT/s10a_tests.log")"
      timeout 240 python3 scripts/bench_fp8_gemv_cuda.py --output "$OUT/gemv_cuda.json" \
          --best "$OUT/gemv_best.json" > "$OUT/gemv_bench.log" 2>&1
      grep -E "^check|^roofline|FAILED|Error" "$OUT/gemv_bench.log" | cut -c1-200 | head -40
      grep -A6 "^====" "$OUT/gemv_bench.log" | tee -a "$SUMMARY"
      [ -s "$OUT/gemv_best.json" ] && export TRTDIST_FP8_GEMV_CUDA_CONFIGS="$OUT/gemv_best.json"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_CUDA_KERNELS=0 bench fp8_b1_triton $M --quant fp8 $B
      bench b1 $M $B
      timeout 120 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
          --quant fp8 --max-model-len 8192 --timeline "$OUT/timeline_cuda.json" \
          > "$OUT/timeline_cuda.log" 2>&1
      note "timeline cuda $(grep wall_ms "$OUT/timeline_cuda.log" | cut -c1-60) \
$(grep "^linear" "$OUT/timeline_cuda.log")"
      ;;
    s10b)  # CUDA GEMV per shape x row kernels triggering early: timelines, then benches
      # (record of that call at 69d7e19's parent: its perf_tmp/*.json tables and the
      # TRTDIST_PDL_ROW_EARLY switch were removed after it; BENCHMARKS.md lists them)
      timeout 200 python3 -m pytest -q -rf -m gpu tests/test_fp8_gemv_cuda.py 2>&1 \
          | tee "$OUT/s10b_tests.log" | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s10b gemv tests: $(tail -1 "$OUT/s10b_tests.log")"
      tl() {  # tl NAME ENV...: one FP8 batch-1 timeline at max_model_len 8192
        local name=$1; shift
        env "$@" timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 \
            --steps 24 --quant fp8 --max-model-len 8192 --timeline "$OUT/tl_$name.json" \
            > "$OUT/tl_$name.log" 2>&1
        note "tl $name $(grep -o '"wall_ms_per_step": [0-9.]*' "$OUT/tl_$name.log") \
$(grep "^linear" "$OUT/tl_$name.log" | cut -c31-)"
      }
      tl triton TRTDIST_CUDA_KERNELS=0
      tl triton_rowearly TRTDIST_CUDA_KERNELS=0 TRTDIST_PDL_ROW_EARLY=1
      tl all_rowearly TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/all.json TRTDIST_PDL_ROW_EARLY=1
      tl alllate_rowearly TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/all_late.json TRTDIST_PDL_ROW_EARLY=1
      tl o_rowearly TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/o.json TRTDIST_PDL_ROW_EARLY=1
      tl oqkv_rowearly TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/o_qkv.json TRTDIST_PDL_ROW_EARLY=1
      tl o TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/o.json
      best=$(cd "$OUT" && grep -H -o '"wall_ms_per_step": [0-9.]*' tl_*.log \
          | sort -t: -k3 -n | head -1 | cut -d. -f1 | sed 's/^tl_//')
      note "best timeline: $best"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      benv() {  # the env of timeline NAME
        case $1 in
          triton) echo TRTDIST_CUDA_KERNELS=0;;
          triton_rowearly) echo TRTDIST_CUDA_KERNELS=0 TRTDIST_PDL_ROW_EARLY=1;;
          all) echo TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/all.json;;
          all_rowearly) echo TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/all.json TRTDIST_PDL_ROW_EARLY=1;;
          alllate_rowearly) echo TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/all_late.json TRTDIST_PDL_ROW_EARLY=1;;
          o_rowearly) echo TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/o.json TRTDIST_PDL_ROW_EARLY=1;;
          oqkv_rowearly) echo TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/o_qkv.json TRTDIST_PDL_ROW_EARLY=1;;
          o) echo TRTDIST_FP8_GEMV_CUDA_CONFIGS=perf_tmp/o.json;;
        esac
      }
      env $(benv "$best") bash -c "$(declare -f bench note); OUT=$OUT SUMMARY=$SUMMARY; \
          bench fp8_b1_$best $M --quant fp8 $B"
      TRTDIST_CUDA_KERNELS=0 bench fp8_b1_triton $M --quant fp8 $B
      env $(benv "$best") bash -c "$(declare -f bench note); OUT=$OUT SUMMARY=$SUMMARY; \
          bench b1_$best $M $B"
      ;;
    s10c)  # CUDA GEMV for o only (per-MMA float32 sums): batch 1 A/B, tests, K = 4096 microbench
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_CUDA_KERNELS=0 bench fp8_b1_triton $M --quant fp8 $B
      bench b1 $M $B
      bench fp8_b1_again $M --quant fp8 $B
      timeout 120 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
          --quant fp8 --max-model-len 8192 --timeline "$OUT/tl_s10c.json" > "$OUT/tl_s10c.log" 2>&1
      note "tl s10c $(grep -o '"wall_ms_per_step": [0-9.]*' "$OUT/tl_s10c.log") \
$(grep "^linear" "$OUT/tl_s10c.log" | cut -c31-)"
      timeout 200 python3 -m pytest -q -rf -n 4 -m gpu tests/test_fp8_gemv_cuda.py \
          tests/test_fp8_kernels.py tests/test_row_amax.py 2>&1 | tee "$OUT/s10c_tests.log" \
          | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s10c gpu tests: $(tail -1 "$OUT/s10c_tests.log")"
      timeout 150 python3 scripts/bench_fp8_gemv_cuda.py --shapes qkv,o,gate_up \
          --output "$OUT/gemv_cuda.json" --best "$OUT/gemv_best.json" > "$OUT/gemv_bench.log" 2>&1
      grep -E "^precision|FAILED|Error" "$OUT/gemv_bench.log" | cut -c1-200 | head -20
      grep -A6 "^====" "$OUT/gemv_bench.log" | tee -a "$SUMMARY"
      ;;
    s10d)  # the session's last code: the CUDA GEMV and FP8 GEMM GPU tests, batch 1 FP8 / bf16
      timeout 240 python3 -m pytest -q -rf -n 4 -m gpu tests/test_fp8_gemv_cuda.py \
          tests/test_fp8_kernels.py tests/test_row_amax.py tests/test_fp8.py 2>&1 \
          | tee "$OUT/s10d_tests.log" | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s10d gpu tests: $(tail -1 "$OUT/s10d_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench b1 $M $B
      ;;
    s10r)  # after the review (launch without a stream argument, x's shared buffer only when
      # staged, the bench on bench_fused_kernels.time_graph): GPU tests, o microbench, batch 1
      timeout 240 python3 -m pytest -q -rf -n 4 -m gpu tests/test_fp8_gemv_cuda.py \
          tests/test_fp8_kernels.py tests/test_row_amax.py 2>&1 | tee "$OUT/s10r_tests.log" \
          | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s10r gpu tests: $(tail -1 "$OUT/s10r_tests.log")"
      timeout 120 python3 scripts/bench_fp8_gemv_cuda.py --shapes o --output "$OUT/gemv_o.json" \
          --best "$OUT/gemv_o_best.json" > "$OUT/gemv_o.log" 2>&1
      grep -A2 "^====" "$OUT/gemv_o.log" | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench b1 $M $B
      ;;
    # s11a-s11g: records of the eleventh session's calls. The one-launch decode MLP, its tests
    # and scripts/bench_decode_mlp.py were removed after them (PERF_NOTES.md, eleventh
    # session; code at ad28e68, the fastest version, and 9005655, the last).
    s11a)  # the one-launch decode MLP (o .. down persistent): GPU tests, timelines per launch
      # config, batch 1 FP8 on / off against bf16
      timeout 300 python3 -m pytest -q -rf -m gpu tests/test_fp8_decode_mlp.py 2>&1 \
          | tee "$OUT/s11a_tests.log" | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s11a decode-mlp tests: $(tail -1 "$OUT/s11a_tests.log")"
      for c in 16,4 16,3 8,8 16,2; do
        TRTDIST_FP8_DECODE_MLP_CONFIG=$c timeout 150 python3 scripts/profile_decode.py --batch 1 \
            --context 128 --steps 24 --quant fp8 --max-model-len 8192 \
            --timeline "$OUT/tl_$c.json" > "$OUT/tl_$c.log" 2>&1
        note "tl $c rc=$? $(grep -o '"wall_ms_per_step": [0-9.]*' "$OUT/tl_$c.log") \
$(grep -E "^fp8_decode_mlp" "$OUT/tl_$c.log" | cut -c61-)"
      done
      grep -A14 "^kernel (by critical" "$OUT/tl_16,4.log" | cut -c1-100 | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_FP8_DECODE_MLP=0 bench fp8_b1_sep $M --quant fp8 $B
      bench b1 $M $B
      ;;
    s11b)  # the decode MLP's tests (device fix) and its microbench with per-phase stamps
      timeout 300 python3 -m pytest -q -rf -m gpu tests/test_fp8_decode_mlp.py 2>&1 \
          | tee "$OUT/s11b_tests.log" | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s11b decode-mlp tests: $(tail -1 "$OUT/s11b_tests.log")"
      timeout 240 python3 scripts/bench_decode_mlp.py --configs 16,4 16,2 8,4 \
          --output "$OUT/decode_mlp.json" 2>&1 | tee "$OUT/decode_mlp.log" | tail -12 | tee -a "$SUMMARY"
      ;;
    s11c)  # L2 prefetch beyond the ring before each grid barrier: tests, microbench of
      # configs, then batch 1 with the fastest against the separate kernels and bf16
      decode_mlp_call s11c 16,4 16,4,4 16,4,8 16,4,16 16,2,8 16,3,12
      ;;
    s11d)  # the TMA-fed decode MLP (producer warp, shared-memory ring): tests, microbench,
      # batch 1 with the fastest config against the separate kernels and bf16
      decode_mlp_call s11d 8,1,11 8,1,6 4,1,12 4,2,8 16,1,5 8,2,6
      ;;
    s11e)  # decode MLP: the producer warp's 16 lanes copy a stage's rows together; scales and
      # residual staged in shared memory. Tests, microbench, batch 1 with the fastest config
      decode_mlp_call s11e 8,1,11 8,2,6 16,1,5 4,4,6 4,2,11 8,1,6
      ;;
    s11f)  # decode MLP: gate | up pairs handed out by a global counter (dynamic balance)
      decode_mlp_call s11f 8,2,6 16,1,5 8,1,11 4,4,6 8,2,4
      ;;
    s11g)  # decode MLP: single gate | up tiles handed out, SiLU x up after barrier 2 in every CTA
      decode_mlp_call s11g 8,2,6 16,1,5 8,2,5 8,1,11
      ;;
    s11r)  # the session's last code (the decode MLP removed): GPU tests of the FP8 decode path,
      # batch 1 FP8 / bf16
      timeout 240 python3 -m pytest -q -rf -n 4 -m gpu tests/test_fp8_gemv_cuda.py \
          tests/test_fp8_kernels.py tests/test_row_amax.py 2>&1 | tee "$OUT/s11r_tests.log" \
          | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s11r gpu tests: $(tail -1 "$OUT/s11r_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench b1 $M $B
      bench fp8_b1_again $M --quant fp8 $B
      ;;
    s11s)  # raw streaming through a TMA ring by stage shape (no math), against a torch read
      timeout 300 python3 scripts/bench_tma_stream.py --output "$OUT/tma_stream.json" 2>&1 \
          | tee "$OUT/tma_stream.log" | tail -20 | tee -a "$SUMMARY"
      ;;
    s11v)  # after the review (launch takes dynamic shared memory; the TMA bench calls it)
      timeout 240 python3 -m pytest -q -rf -n 4 -m gpu tests/test_fp8_gemv_cuda.py \
          tests/test_row_amax.py 2>&1 | tee "$OUT/s11v_tests.log" \
          | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s11v gpu tests: $(tail -1 "$OUT/s11v_tests.log")"
      timeout 300 python3 scripts/bench_tma_stream.py --output "$OUT/tma_stream.json" 2>&1 \
          | tee "$OUT/tma_stream.log" | tail -20 | tee -a "$SUMMARY"
      ;;
    s12a)  # split-K for the one-token FP8 GEMVs (fixup / epilogue / partials only), and the
      # batch-1 timelines of both dtypes at the session's start
      timeout 420 python3 scripts/bench_split_gemv.py --output "$OUT/split_gemv.json" 2>&1 \
          | tee "$OUT/split_gemv.log" | tail -6 | tee -a "$SUMMARY"
      for q in fp8 none; do
        timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
            --quant $q --max-model-len 8192 --timeline "$OUT/timeline_$q.json" \
            > "$OUT/timeline_$q.log" 2>&1
        note "timeline $q: $(grep wall_ms "$OUT/timeline_$q.log" | cut -c1-80)"
      done
      ;;
    s12b)  # the FP8 GEMVs' epilogue constants loaded before the PDL wait: GPU tests, the
      # chained shapes, batch-1 timeline and TPOT of both dtypes
      timeout 240 python3 -m pytest -q -rf -n 4 -m gpu tests/test_fp8_gemv_cuda.py \
          tests/test_fp8_kernels.py tests/test_row_amax.py 2>&1 | tee "$OUT/s12b_tests.log" \
          | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s12b gpu tests: $(tail -1 "$OUT/s12b_tests.log")"
      timeout 300 python3 scripts/bench_split_gemv.py --output "$OUT/split_gemv.json" 2>&1 \
          | tee "$OUT/split_gemv.log" | tail -5 | tee -a "$SUMMARY"
      timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
          --quant fp8 --max-model-len 8192 --timeline "$OUT/timeline_fp8.json" \
          > "$OUT/timeline_fp8.log" 2>&1
      note "timeline fp8: $(grep wall_ms "$OUT/timeline_fp8.log" | cut -c1-80)"
      note "$(grep "^linear" "$OUT/timeline_fp8.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench b1 $M $B
      bench fp8_b1_again $M --quant fp8 $B
      ;;
    s12c)  # gemv tiles reduced every K step and a 32-register cap (more programs an SM), then
      # batch 1 with the fastest per shape against the shipped tables and bf16
      timeout 420 python3 scripts/bench_split_gemv.py --set occupancy \
          --output "$OUT/occ_gemv.json" --best "$OUT/occ_best.json" 2>&1 \
          | tee "$OUT/occ_gemv.log" | grep -E "^best|^====|\|" | tee -a "$SUMMARY"
      TRTDIST_FP8_GEMM_CONFIGS="$OUT/occ_best.json" timeout 150 python3 \
          scripts/profile_decode.py --batch 1 --context 128 --steps 24 --quant fp8 \
          --max-model-len 8192 --timeline "$OUT/timeline_best.json" > "$OUT/timeline_best.log" 2>&1
      note "timeline best: $(grep wall_ms "$OUT/timeline_best.log" | cut -c1-80)"
      note "$(grep "^linear" "$OUT/timeline_best.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      TRTDIST_FP8_GEMM_CONFIGS="$OUT/occ_best.json" bench fp8_b1_best $M --quant fp8 $B
      bench b1 $M $B
      bench fp8_b1 $M --quant fp8 $B
      ;;
    s12d)  # every shape split under a 32-register cap: partials (the reduction left to the
      # consumer row kernel) and fixup
      timeout 420 python3 scripts/bench_split_gemv.py --set capped \
          --output "$OUT/cap_gemv.json" 2>&1 | tee "$OUT/cap_gemv.log" \
          | grep -E "^====|\|" | tee -a "$SUMMARY"
      python3 -c "import json; d = json.load(open('$OUT/cap_gemv.json'))['times_us']
for s, t in d.items():
    print(s, ' '.join(f'{c}={v:.2f}' for c, v in sorted(t.items(), key=lambda kv: kv[1])[:6]))" \
          | tee -a "$SUMMARY"
      ;;
    s12e)  # constants loaded before the PDL wait in the row kernels (norm weights; rotary's
      # positions, slots and cos | sin; attention's lengths): their GPU tests, batch-1
      # timelines and TPOT of both dtypes
      timeout 300 python3 -m pytest -q -rf -m gpu -n 4 tests/test_triton_attention.py \
          tests/test_fused_kernels.py tests/test_kernels.py tests/test_fp8_fused.py \
          tests/test_kv_fp8.py tests/test_row_amax.py tests/test_fp8_kernels.py \
          -k "not long_context" 2>&1 | tee "$OUT/s12e_tests.log" \
          | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s12e gpu tests: $(tail -1 "$OUT/s12e_tests.log")"
      for q in fp8 none; do
        timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
            --quant $q --max-model-len 8192 --timeline "$OUT/timeline_$q.json" \
            > "$OUT/timeline_$q.log" 2>&1
        note "timeline $q: $(grep wall_ms "$OUT/timeline_$q.log" | cut -c1-80)"
        note "$(grep -E "^_(rms_norm|rotary|decode_partial|decode_reduce|silu)" "$OUT/timeline_$q.log" \
          | head -6 | awk '{printf "%s %s  ", $1, $3}')"
      done
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench b1 $M $B
      bench fp8_b1_again $M --quant fp8 $B
      ;;
    s12f)  # the throughput goals at this session's code: 1024 x 128/128 FP8, 1000/1000 FP8 +
      # FP8 KV
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8"
      bench fp8_r1024 $M --num-requests 1024 --input-len 128 --output-len 128 --max-batch-size 1024
      bench fp8kv_long $M --kv-cache-dtype fp8 --num-requests 1024 --input-len 1000 \
          --output-len 1000 --max-batch-size 1024
      ;;
    s12g)  # 1000/1000 FP8 + FP8 KV as `final4b` measured it: a warm-up run first (kernels
      # compiled outside the measured run), then two runs
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      L="--num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024"
      bench warm $M --num-requests 64 --input-len 128 --output-len 32
      bench fp8kv_long_a $M $L
      bench fp8kv_long_b $M $L
      ;;
    s13a)  # swap preemption: its GPU tests, then 1000/1000 FP8 + FP8 KV after a warm-up run,
      # recomputing (--swap-space 0, the old behaviour) and swapping (the default), in turn
      run_tests s13a 300 -m gpu tests/test_swap.py
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      L="--num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024"
      bench warm $M --num-requests 64 --input-len 128 --output-len 32
      bench long_recompute $M $L --swap-space 0
      bench long_swap $M $L
      ;;
    s13b)  # the GPU test suite at this session's code (swap preemption, its background
      # page-locking): every file with GPU tests, 4 workers
      run_tests s13b 560 -m gpu -n 4 tests/ -k "not long_context" \
          --ignore tests/test_server.py --ignore tests/test_openai_api.py
      ;;
    s13c)  # 1000/1000 FP8 + FP8 KV with the swap space page-locked in the background (startup
      # back to ~9 s?), twice, after a warm-up run; first the swap GPU tests
      run_tests s13c 120 -m gpu tests/test_swap.py
      M="llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --kv-cache-dtype fp8"
      L="--num-requests 1024 --input-len 1000 --output-len 1000 --max-batch-size 1024"
      bench warm $M --num-requests 64 --input-len 128 --output-len 32
      bench long_swap $M $L
      bench long_swap_b $M $L
      ;;
    s13d)  # the other goals at this code: 1024 x 128/128 FP8, batch 1 FP8 and bf16
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench warm $M --quant fp8 --num-requests 64 --input-len 128 --output-len 32
      bench fp8_r1024 $M --quant fp8 --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      bench fp8_b1 $M --quant fp8 $B
      bench bf16_b1 $M $B
      bench fp8_b1_again $M --quant fp8 $B
      ;;
    s14c)  # (code at b5b1166 / 3c2b929, removed: slower) small decode batches: the first key
      # tile loaded before the PDL wait, rotary letting
      # attention launch after its own wait (TRTDIST_EARLY_KV_MAX_SEQS 0 = off): GPU tests,
      # FP8 batch-1 timelines off / on, TPOT of both dtypes off / on
      run_tests s14c 400 -n 4 -m gpu tests/test_triton_attention.py tests/test_kv_fp8.py \
          tests/test_graphs.py tests/test_kernels.py
      bench warm llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --num-requests 8 \
          --input-len 128 --output-len 32
      batch1_ab TRTDIST_EARLY_KV_MAX_SEQS 0 8 \
          "^_(decode_partial|decode_reduce|rotary_and_cache_kernel) " fp8 bf16
      ;;
    s14d)  # s14c with the newest token's row loaded beside q right after the wait (not after
      # the tiles): attention GPU tests, FP8 timelines off / on, TPOT of both dtypes off / on
      run_tests s14d 300 -n 4 -m gpu tests/test_triton_attention.py tests/test_kv_fp8.py
      batch1_ab TRTDIST_EARLY_KV_MAX_SEQS 0 8 \
          "^_(decode_partial|decode_reduce|rotary_and_cache_kernel) " fp8
      ;;
    s15r)  # after the review (decode's in-iteration block ids through _block_ids; the sweep's
      # prefill through bench_kernels.bench_prefill): attention GPU tests, the prefill sweep
      run_tests s15r 400 -n 4 -m gpu tests/test_triton_attention.py tests/test_kv_fp8.py
      timeout 200 python3 scripts/sweep_decode_pipeline.py --kv fp8 --block-size 32 \
          --prefill-configs 128:64:8:3 --configs 128:4:3:0 --output "$OUT/s15r_sweep.json" 2>&1 \
          | grep -E "TFLOP|of copy|^copy" | tee -a "$SUMMARY"
      ;;
    s19r)  # after the review (one unit_output for every epilogue of the streaming GEMV,
      # split_qkv shared): its GPU tests and the rotary kernel's, batch-1 FP8 TPOT
      export BENCH_TIMEOUT=240
      run_tests s19r 300 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fused_kernels.py
      bench fp8_b1 llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --num-requests 1 \
          --input-len 128 --output-len 256
      ;;
    s19i)  # an H100 (nvidia-h100-x1): batch-1 FP8 / bf16 at the final code, FP8 with the old
      # attention launch
      export BENCH_TIMEOUT=240
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench bf16_b1 $M $B
      TRTDIST_ATTN_ROW_CONFIG=none TRTDIST_ATTN_KV_EARLY=0 bench fp8_b1_old $M --quant fp8 $B
      bench fp8_b1_2 $M --quant fp8 $B
      ;;
    s19h)  # the final code: batch 1 FP8 and bf16 interleaved, three pairs, and batch 8
      export BENCH_TIMEOUT=240
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      for i in 1 2 3; do
        bench fp8_b1_$i $M --quant fp8 $B
        bench bf16_b1_$i $M $B
      done
      bench fp8_b8 $M --quant fp8 --num-requests 8 --input-len 128 --output-len 256
      ;;
    s19g)  # the final code (one-sequence minimum 128 keys a slice): the GPU tests of what
      # the session changed, then both throughput goals (the early exit of empty partitions
      # reaches every batch size)
      export BENCH_TIMEOUT=240
      run_tests s19g 330 -n 4 -m gpu tests/test_triton_attention.py tests/test_fp8_gemv_stream.py \
          tests/test_graphs.py tests/test_fp8.py tests/test_kv_fp8.py tests/test_equivalence.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      bench r1024 $M --quant fp8 --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      bench long $M --quant fp8 --kv-cache-dtype fp8 --num-requests 1024 --input-len 1000 \
          --output-len 1000 --max-batch-size 1024
      ;;
    s19f)  # partitions past the keys leave before the wait (merge in the partial): the
      # attention GPU tests, then s19e's slice minimums again at 128 / 256 and ~8k
      export BENCH_TIMEOUT=240
      run_tests s19f 300 -n 4 -m gpu tests/test_triton_attention.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      L="--num-requests 1 --input-len 7936 --output-len 128"
      OLD="TRTDIST_ATTN_ROW_CONFIG=none TRTDIST_ATTN_KV_EARLY=0"
      bench fp8_b1_mc256 $M --quant fp8 $B
      TRTDIST_ATTN_ROW_MIN_CHUNK=128 bench fp8_b1_mc128 $M --quant fp8 $B
      TRTDIST_ATTN_ROW_MIN_CHUNK=64 bench fp8_b1_mc64 $M --quant fp8 $B
      (export $OLD; bench fp8_8k_old $M --quant fp8 $L)
      TRTDIST_ATTN_ROW_MIN_CHUNK=128 bench fp8_8k_mc128 $M --quant fp8 $L
      TRTDIST_ATTN_ROW_MIN_CHUNK=64 bench fp8_8k_mc64 $M --quant fp8 $L
      bench bf16_b1 $M $B
      TRTDIST_ATTN_ROW_MIN_CHUNK=128 bench bf16_b1_mc128 $M $B
      ;;
    s19e)  # the one-sequence launch's slices at a ~8k context (32-key tiles walk 8 a slice
      # at the default 256-key minimum, slower than the old launch in s19d): minimum 128 and
      # 64 keys a slice, at 8k and at 128 / 256, FP8 and bf16
      export BENCH_TIMEOUT=240
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      L="--num-requests 1 --input-len 7936 --output-len 128"
      OLD="TRTDIST_ATTN_ROW_CONFIG=none TRTDIST_ATTN_KV_EARLY=0"
      (export $OLD; bench fp8_8k_old $M --quant fp8 $L)
      bench fp8_8k_mc256 $M --quant fp8 $L
      TRTDIST_ATTN_ROW_MIN_CHUNK=128 bench fp8_8k_mc128 $M --quant fp8 $L
      TRTDIST_ATTN_ROW_MIN_CHUNK=64 bench fp8_8k_mc64 $M --quant fp8 $L
      bench fp8_b1_mc256 $M --quant fp8 $B
      TRTDIST_ATTN_ROW_MIN_CHUNK=128 bench fp8_b1_mc128 $M --quant fp8 $B
      TRTDIST_ATTN_ROW_MIN_CHUNK=64 bench fp8_b1_mc64 $M --quant fp8 $B
      (export $OLD; bench bf16_8k_old $M $L)
      TRTDIST_ATTN_ROW_MIN_CHUNK=128 bench bf16_8k_mc128 $M $L
      bench bf16_b1 $M $B
      ;;
    s19d)  # the new defaults (one-sequence decode 32:4:2 with its first tile before the
      # wait, rotary in the qkv GEMV): the GPU tests of what changed, batch-1 FP8 / bf16 at
      # 128 / 256 (twice) and at a ~8k context, each against the old attention launch
      export BENCH_TIMEOUT=240
      run_tests s19d 330 -n 4 -m gpu tests/test_triton_attention.py tests/test_fp8_gemv_stream.py \
          tests/test_graphs.py tests/test_fp8.py tests/test_equivalence.py tests/test_kv_fp8.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      L="--num-requests 1 --input-len 7936 --output-len 128"
      OLD="TRTDIST_ATTN_ROW_CONFIG=none TRTDIST_ATTN_KV_EARLY=0"
      bench fp8_b1 $M --quant fp8 $B
      bench bf16_b1 $M $B
      (export $OLD; bench fp8_b1_old $M --quant fp8 $B)
      (export $OLD; bench bf16_b1_old $M $B)
      bench fp8_b1_2 $M --quant fp8 $B
      bench bf16_b1_2 $M $B
      bench fp8_8k $M --quant fp8 $L
      (export $OLD; bench fp8_8k_old $M --quant fp8 $L)
      bench bf16_8k $M $L
      (export $OLD; bench bf16_8k_old $M $L)
      ;;
    s19c)  # s19b's variants again, interleaved (v4 = KV early + 32:4:2 at the default
      # program target was fastest once), 32:4:1, v4 without the rotary epilogue; bf16 both
      export BENCH_TIMEOUT=240
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      P="^(linear|[A-Za-z_0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$)"
      V4="TRTDIST_ATTN_KV_EARLY=1 TRTDIST_ATTN_ROW_CONFIG=32:4:2"
      bench fp8_b1_v0a $M --quant fp8 $B
      (export $V4; bench fp8_b1_v4a $M --quant fp8 $B)
      (export $V4 TRTDIST_ATTN_ROW_PROGRAMS=128; bench fp8_b1_v2a $M --quant fp8 $B)
      (export TRTDIST_ATTN_KV_EARLY=1 TRTDIST_ATTN_ROW_CONFIG=32:4:1; bench fp8_b1_v7 $M --quant fp8 $B)
      (export $V4 TRTDIST_STREAM_GEMV_ROTARY=0; bench fp8_b1_v9 $M --quant fp8 $B)
      (export $V4; bench fp8_b1_v4b $M --quant fp8 $B)
      bench fp8_b1_v0b $M --quant fp8 $B
      bench bf16_b1 $M $B
      (export $V4; bench bf16_b1_v4 $M $B)
      (export $V4; fp8_variant v4 "kv early + 32:4:2" "$P")
      ;;
    s19b)  # batch-1 decode attention beside the qkv GEMV: its first K / V tile before the
      # PDL wait (TRTDIST_ATTN_KV_EARLY), a launch small enough to sit beside the GEMV's CTA
      # (TRTDIST_ATTN_ROW_CONFIG 32:4:2, 21 KB) and one program an SM (ROW_PROGRAMS 128):
      # attention GPU tests with them on, then FP8 / bf16 batch-1 TPOT over the variants
      export BENCH_TIMEOUT=240
      TRTDIST_ATTN_KV_EARLY=1 TRTDIST_ATTN_ROW_CONFIG=32:4:2 run_tests s19b 300 -n 4 -m gpu \
          tests/test_triton_attention.py -k "decode or every_block or long"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      P="^(linear|[A-Za-z_0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$)"
      fp8_variant v0 "default" "$P"
      TRTDIST_ATTN_KV_EARLY=1 bench fp8_b1_v1 $M --quant fp8 $B
      (export TRTDIST_ATTN_KV_EARLY=1 TRTDIST_ATTN_ROW_CONFIG=32:4:2 TRTDIST_ATTN_ROW_PROGRAMS=128
       fp8_variant v2 "kv early + 32:4:2 + 128 programs" "$P")
      TRTDIST_ATTN_ROW_CONFIG=32:4:2 TRTDIST_ATTN_ROW_PROGRAMS=128 bench fp8_b1_v3 $M --quant fp8 $B
      TRTDIST_ATTN_KV_EARLY=1 TRTDIST_ATTN_ROW_CONFIG=32:4:2 bench fp8_b1_v4 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_ROTARY=0 TRTDIST_ATTN_KV_EARLY=1 TRTDIST_ATTN_ROW_CONFIG=32:4:2 \
          TRTDIST_ATTN_ROW_PROGRAMS=128 bench fp8_b1_v5 $M --quant fp8 $B
      bench bf16_b1 $M $B
      TRTDIST_ATTN_KV_EARLY=1 TRTDIST_ATTN_ROW_CONFIG=32:4:2 TRTDIST_ATTN_ROW_PROGRAMS=128 \
          bench bf16_b1_v2 $M $B
      ;;
    s19a)  # rotary + KV write in the qkv streaming GEMV's epilogue (TRTDIST_STREAM_GEMV_ROTARY):
      # its GPU tests and the rotary kernel's, batch-1 FP8 timelines and TPOT off / on, bf16
      export BENCH_TIMEOUT=240
      run_tests s19a 400 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fused_kernels.py \
          -k "rotary or stage or gated"
      batch1_ab TRTDIST_STREAM_GEMV_ROTARY 0 1 "^(linear|[A-Za-z_0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$)" fp8
      bench bf16_b1 llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 \
          --input-len 128 --output-len 256
      ;;
    s18j)  # streaming GEMV with 8 consumer warps (half the MMA phase after x arrives) for o,
      # qkv, both, every shape: batch-1 FP8 TPOT against the default (4 warps), bf16
      export BENCH_TIMEOUT=240
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      D=2048:6:4:3 W=2048:6:8:3
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_CONFIG="$D,4096x4096=$W" bench fp8_b1_o8 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_CONFIG="$D,6144x4096=$W" bench fp8_b1_qkv8 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_CONFIG="$D,4096x4096=$W,6144x4096=$W" bench fp8_b1_oqkv8 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_CONFIG="$W" bench fp8_b1_all8 $M --quant fp8 $B
      bench bf16_b1 $M $B
      ;;
    s18i)  # the final code: batch 1 FP8 and bf16 interleaved, three of each (the ratio's
      # spread within one machine)
      export BENCH_TIMEOUT=240
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      for i in 1 2 3; do
        bench fp8_b1_$i $M --quant fp8 $B
        bench bf16_b1_$i $M $B
      done
      ;;
    s18h)  # the final code (the fewest-keys option removed, the table switch validated):
      # attention and streaming-GEMV GPU tests, batch 1 FP8 / bf16
      export BENCH_TIMEOUT=240
      run_tests s18h 400 -n 4 -m gpu tests/test_triton_attention.py tests/test_kv_fp8.py \
          tests/test_fp8_gemv_stream.py tests/test_fp8_gemv_cuda.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench bf16_b1 $M $B
      ;;
    s18g)  # an H100: batch-1 FP8 with the streaming GEMV (default) and without, bf16, batch 8
      export BENCH_TIMEOUT=240
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV=0 bench fp8_b1_nostream $M --quant fp8 $B
      bench bf16_b1 $M $B
      bench fp8_b8 $M --quant fp8 --num-requests 8 --input-len 128 --output-len 256
      ;;
    s18f)  # the session's last code on one H200: the GPU tests of the paths it changed, the
      # batch-1 figures again, and 1000 / 1000 with this session's defaults against all of
      # them off (stream, merge in the partial, block ids before the wait)
      export BENCH_TIMEOUT=240
      run_tests s18f 300 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fp8.py \
          tests/test_graphs.py tests/test_row_amax.py tests/test_fp8_fused.py \
          tests/test_equivalence.py tests/test_overlap.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      bench bf16_b1 $M $B
      L="--quant fp8 --kv-cache-dtype fp8 --num-requests 1024 --input-len 1000 --output-len 1000"
      bench long $M $L --max-batch-size 1024
      TRTDIST_STREAM_GEMV=0 TRTDIST_ATTN_MERGE=kernel TRTDIST_ATTN_TABLE_EARLY=0 \
          bench long_s17 $M $L --max-batch-size 1024
      ;;
    s18e)  # (refused: nvidia-h200-x2 not lent in the eighteenth session) two GPUs: the multi-rank GPU tests at (tp, pp) = (2, 1) / (1, 2) with this
      # session's attention (merge in the partial, block ids before the wait) and the stream
      # on by default; then TP 2 batch 1: FP8 with the stream (it takes o and gate | up there)
      # and without, bf16
      export BENCH_TIMEOUT=200
      timeout 300 python3 -m pytest -q -rf -m mpi tests/test_graphs.py tests/test_fp8.py \
          tests/test_kv_fp8.py tests/test_equivalence.py -k "2-1 or 1-2" 2>&1 \
          | tee "$OUT/s18e_tests.log" | grep -E "^FAILED|^E  " | cut -c1-200 | head -20
      note "s18e tests on $(nvidia-smi -L | wc -l) GPU(s): $(tail -1 "$OUT/s18e_tests.log")"
      M="llama3-8b --dummy-weights --dtype bfloat16 --tp-size 2"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_tp2_b1 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV=0 bench fp8_tp2_b1_nostream $M --quant fp8 $B
      bench bf16_tp2_b1 $M $B
      ;;
    s18d)  # the decode's first block ids loaded before its PDL wait (TRTDIST_ATTN_TABLE_EARLY
      # A/B), with the merge in the partial and the stream by default: attention GPU tests,
      # batch-1 TPOT FP8 / bf16 on / off, batch 8, then the two throughput goals (128 / 128
      # with the table early on and off; 1000 / 1000 with an FP8 cache, which loads its
      # block ids in the loop)
      export BENCH_TIMEOUT=240
      run_tests s18d 300 -n 4 -m gpu tests/test_triton_attention.py tests/test_kv_fp8.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_ATTN_TABLE_EARLY=0 bench fp8_b1_tablelate $M --quant fp8 $B
      bench bf16_b1 $M $B
      TRTDIST_ATTN_TABLE_EARLY=0 bench bf16_b1_tablelate $M $B
      bench fp8_b1_again $M --quant fp8 $B
      bench fp8_b8 $M --quant fp8 --num-requests 8 --input-len 128 --output-len 256
      bench r1024 $M --quant fp8 --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      TRTDIST_ATTN_TABLE_EARLY=0 bench r1024_tablelate $M --quant fp8 --num-requests 1024 \
          --input-len 128 --output-len 128 --max-batch-size 1024
      bench long $M --quant fp8 --kv-cache-dtype fp8 --num-requests 1024 --input-len 1000 \
          --output-len 1000 --max-batch-size 1024
      ;;
    s18c)  # (ran at 5ac3de7; NORM_OUT was slower and reverted) o / down GEMMs running the
      # next add + RMSNorm + quantization in their last CTA (NORM_OUT): GPU tests, then
      # batch-1 TPOT FP8 on / off, bf16, a timeline, batch 8
      export BENCH_TIMEOUT=200
      run_tests s18c 400 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fp8.py \
          tests/test_graphs.py tests/test_row_amax.py tests/test_fp8_fused.py \
          tests/test_fp8_decode_step.py
      grep -a "^seq_len" "$OUT/s18c_tests.log" | head -6 | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_NORM_OUT=0 bench fp8_b1_normkernels $M --quant fp8 $B
      bench bf16_b1 $M $B
      fp8_variant t "defaults" "^linear|^_[a-z_]+ |^fp8_gemv"
      sed -n '/one step/,/last 12/p' "$OUT/timeline_t.log" | sed -n 2,12p >> "$SUMMARY"
      bench fp8_b8 $M --quant fp8 --num-requests 8 --input-len 128 --output-len 256
      ;;
    s18b)  # FP8 batch-1 TPOT over per-shape prefill limits of the streaming GEMV and over
      # the split decode's fewest keys a slice (short sequences unsplit: no merge); bf16 too
      export BENCH_TIMEOUT=200
      run_tests s18b 300 -n 4 -m gpu tests/test_triton_attention.py -k "decode or merge" \
          tests/test_fp8_gemv_cuda.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      D=2048:6:4:3
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_ATTN_MIN_CHUNK=128 bench fp8_b1_mc128 $M --quant fp8 $B
      TRTDIST_ATTN_MIN_CHUNK=256 bench fp8_b1_mc256 $M --quant fp8 $B
      for v in 4096x4096:1 4096x4096:2 28672x4096:2 6144x4096:0 4096x14336:4 4096x14336:2; do
        TRTDIST_STREAM_GEMV_CONFIG="$D,${v%:*}=2048:6:4:${v#*:}" bench "fp8_b1_${v/:/_p}" \
            $M --quant fp8 $B
      done
      bench bf16_b1 $M $B
      TRTDIST_ATTN_MIN_CHUNK=256 bench bf16_b1_mc256 $M $B
      ;;
    s18a)  # the split decode merged by its last partition program (no _decode_reduce
      # launch), the streaming GEMV on by default with a per-device early trigger: GPU
      # tests, then batch-1 TPOT, FP8 and bf16, with the merge in the partial / its own kernel,
      # FP8 without the stream; an FP8 timeline; FP8 batch 8
      export BENCH_TIMEOUT=200
      run_tests s18a_attn 300 -n 4 -m gpu tests/test_triton_attention.py tests/test_kv_fp8.py \
          tests/test_row_amax.py
      run_tests s18a_fp8 300 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fp8.py \
          tests/test_graphs.py tests/test_fp8_fused.py tests/test_fp8_gemv_cuda.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench fp8_b1 $M --quant fp8 $B
      TRTDIST_ATTN_MERGE=kernel bench fp8_b1_mergekernel $M --quant fp8 $B
      bench bf16_b1 $M $B
      TRTDIST_ATTN_MERGE=kernel bench bf16_b1_mergekernel $M $B
      TRTDIST_STREAM_GEMV=0 bench fp8_b1_nostream $M --quant fp8 $B
      fp8_variant t "defaults" "^linear|^_[a-z_]+ |^fp8_gemv"
      bench fp8_b8 $M --quant fp8 --num-requests 8 --input-len 128 --output-len 256
      ;;
    # NOTE: s17a-s17g ran with the streaming GEMV's defaults of the commits that added them
    # (ring 1 KB x 4 in s17a, 2 KB x 3 in s17b-s17c; fused inputs on in s17c-s17d; no prefill
    # limit and no gated output before s17h): their variants name what they measured.
    s17h)  # the best of s17g again (prefill 3, SiLU x up in the gate | up epilogue), the o
      # projection with its whole ring prefilled (its gap, the attention, is the longest),
      # prefill 4; bf16 in the same call
      export BENCH_TIMEOUT=200 TRTDIST_STREAM_GEMV=1 TRTDIST_STREAM_GEMV_GATED=1
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      TRTDIST_STREAM_GEMV_PREFILL=3 bench fp8_b1_p3 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_CONFIG=2048:6:4:3,4096x4096=2048:6:4 bench fp8_b1_p3o6 $M --quant fp8 $B
      TRTDIST_STREAM_GEMV_PREFILL=4 bench fp8_b1_p4 $M --quant fp8 $B
      unset TRTDIST_STREAM_GEMV TRTDIST_STREAM_GEMV_GATED
      bench bf16_b1 $M $B
      ;;
    s17g)  # streaming GEMV: a limited prefill before the producer waits too (a smaller burst
      # in front of the row kernels), and SiLU x up in the gate | up epilogue (no SiLU
      # kernel): GPU tests, then FP8 batch-1 TPOT per variant (timelines for two), bf16
      export BENCH_TIMEOUT=240
      run_tests s17g 300 -n 4 -m gpu tests/test_fp8_gemv_stream.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      i=0
      for v in "0 0 0" "1 0 0" "1 3 0" "1 2 0" "1 0 1" "1 3 1"; do
        set -- $v; i=$((i + 1))
        export TRTDIST_STREAM_GEMV=$1 TRTDIST_STREAM_GEMV_PREFILL=$2 TRTDIST_STREAM_GEMV_GATED=$3
        [ "$2" = 0 ] && unset TRTDIST_STREAM_GEMV_PREFILL
        bench fp8_b1_v$i $M --quant fp8 $B
        if [ $i = 2 ] || [ $i = 6 ]; then
          timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
              --quant fp8 --max-model-len 8192 --timeline "$OUT/timeline_$i.json" \
              > "$OUT/timeline_$i.log" 2>&1
          note "timeline $i ($v): $(grep wall_ms "$OUT/timeline_$i.log" | cut -c1-60)"
          grep -E "^linear|^_[a-z_]+ |^fp8_gemv" "$OUT/timeline_$i.log" | head -9 | tee -a "$SUMMARY"
        fi
      done
      unset TRTDIST_STREAM_GEMV TRTDIST_STREAM_GEMV_PREFILL TRTDIST_STREAM_GEMV_GATED
      bench bf16_b1 $M $B
      ;;
    s17f)  # the streaming GEMV as shipped opt-in (6 x 2 KB ring, inputs unfused, early
      # triggers only for one-row launches): GPU tests, the FP8 model / graph tests with it
      # on, then batch 1 and batch 8 TPOT off / on, bf16, one timeline on
      export BENCH_TIMEOUT=240
      run_tests s17f 300 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fp8_gemv_cuda.py
      TRTDIST_STREAM_GEMV=1 run_tests s17f_model 300 -n 4 -m gpu tests/test_fp8.py \
          tests/test_graphs.py tests/test_fp8_fused.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      B8="--num-requests 8 --input-len 128 --output-len 256"
      TRTDIST_STREAM_GEMV=0 bench fp8_b1_off $M --quant fp8 $B
      TRTDIST_STREAM_GEMV=1 bench fp8_b1_on $M --quant fp8 $B
      bench bf16_b1 $M $B
      TRTDIST_STREAM_GEMV=0 bench fp8_b8_off $M --quant fp8 $B8
      TRTDIST_STREAM_GEMV=1 bench fp8_b8_on $M --quant fp8 $B8
      TRTDIST_STREAM_GEMV=1 timeout 150 python3 scripts/profile_decode.py --batch 1 \
          --context 128 --steps 24 --quant fp8 --max-model-len 8192 \
          --timeline "$OUT/timeline_on.json" > "$OUT/timeline_on.log" 2>&1
      note "timeline on: $(grep wall_ms "$OUT/timeline_on.log" | cut -c1-60)"
      grep -E "^linear|^_[a-z_]+ |^fp8_gemv" "$OUT/timeline_on.log" | head -9 | tee -a "$SUMMARY"
      ;;
    s17e)  # the fused inputs read coalesced (run r by thread r mod threads) with fast
      # division in SiLU: GPU tests, then FP8 batch-1 timelines / TPOT: off, fused, norms
      # only (SiLU x up by its kernel), unfused; bf16
      export BENCH_TIMEOUT=240
      run_tests s17e 400 -n 4 -m gpu tests/test_fp8_gemv_stream.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      ROWS="rms_norm_quant_kernel|rms_norm_kernel|silu_and_mul_kernel|rotary_and_cache_kernel|decode_partial|decode_reduce"
      i=0
      for v in "0 1" "1 1" "1 norm" "1 0"; do
        set -- $v; i=$((i + 1))
        export TRTDIST_STREAM_GEMV=$1 TRTDIST_STREAM_GEMV_CONFIG=2048:6:4 TRTDIST_STREAM_GEMV_FUSED=$2
        fp8_variant $i "$v" "^linear|^_($ROWS) |^fp8_gemv"
        sed -n '/one step/,/last 12/p' "$OUT/timeline_$i.log" | sed -n 6,16p >> "$SUMMARY"
      done
      unset TRTDIST_STREAM_GEMV TRTDIST_STREAM_GEMV_CONFIG TRTDIST_STREAM_GEMV_FUSED
      bench bf16_b1 $M $B
      ;;
    s17d)  # s17c with every input row loaded before any use (one L2 round trip, not one a
      # 16-byte run): GPU tests, then FP8 batch-1 timelines and TPOT: off, fused with two
      # rings, unfused; bf16
      export BENCH_TIMEOUT=240
      run_tests s17d 400 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fp8_gemv_cuda.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      ROWS="rms_norm_quant_kernel|rms_norm_kernel|silu_and_mul_kernel|rotary_and_cache_kernel|decode_partial|decode_reduce"
      i=0
      for v in "0 - 1" "1 2048:6:4 1" "1 2048:4:4 1" "1 2048:6:4 0"; do
        set -- $v; i=$((i + 1))
        export TRTDIST_STREAM_GEMV=$1 TRTDIST_STREAM_GEMV_CONFIG=$2 TRTDIST_STREAM_GEMV_FUSED=$3
        [ "$2" = - ] && unset TRTDIST_STREAM_GEMV_CONFIG
        fp8_variant $i "$v" "^linear|^_($ROWS) |^fp8_gemv"
      done
      unset TRTDIST_STREAM_GEMV TRTDIST_STREAM_GEMV_CONFIG TRTDIST_STREAM_GEMV_FUSED
      bench bf16_b1 $M $B
      ;;
    s17c)  # one-token FP8 GEMMs computing their own inputs (norm, SiLU x up, per-token
      # quantization) in the streaming GEMV: GPU tests (kernel modes, stage against the
      # dequantized twin, graphs), then FP8 batch-1 timelines and TPOT per ring table, bf16
      export BENCH_TIMEOUT=240
      run_tests s17c 400 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fp8_gemv_cuda.py \
          tests/test_fp8_decode_step.py
      grep -a "^seq_len" "$OUT/s17c_tests.log" | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      ROWS="rms_norm_quant_kernel|rms_norm_kernel|silu_and_mul_kernel|rotary_and_cache_kernel|decode_partial|decode_reduce"
      i=0
      for v in "0 -" "1 2048:6:4" "1 4096:3:4,14336=2048:6:4" "1 2048:3:4" "1 2048:4:4"; do
        set -- $v; i=$((i + 1))
        export TRTDIST_STREAM_GEMV=$1 TRTDIST_STREAM_GEMV_CONFIG=$2
        [ "$2" = - ] && unset TRTDIST_STREAM_GEMV_CONFIG
        fp8_variant $i "$v" "^linear|^_($ROWS) |^fp8_gemv"
      done
      unset TRTDIST_STREAM_GEMV TRTDIST_STREAM_GEMV_CONFIG
      bench bf16_b1 $M $B
      ;;
    s17b)  # the streaming GEMV with larger rings (2 KB / 4 KB copies, ~100 / ~200 KB): its
      # GPU tests, the bench, then FP8 batch-1 timelines and TPOT for each ring table, row
      # kernels triggering early, and the largest with late triggers
      export BENCH_TIMEOUT=240
      run_tests s17b 300 -n 4 -m gpu tests/test_fp8_gemv_stream.py
      timeout 400 python3 scripts/bench_fp8_gemv_stream.py --output "$OUT/stream.json" 2>&1 \
          | grep -a -v "warning\|Remark" | tee "$OUT/stream.log" | tail -60 | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      ROWS="rms_norm_quant_kernel|silu_and_mul_kernel|rotary_and_cache_kernel|decode_partial|decode_reduce"
      i=0
      for v in "0 - -" "1 1 2048:3:4" "1 1 2048:6:4" "1 1 4096:3:4,14336=2048:6:4" \
               "1 0 4096:3:4,14336=2048:6:4"; do
        set -- $v; i=$((i + 1))
        export TRTDIST_STREAM_GEMV=$1 TRTDIST_PDL_EARLY=$2 TRTDIST_STREAM_GEMV_CONFIG=$3
        [ "$2" = - ] && unset TRTDIST_PDL_EARLY TRTDIST_STREAM_GEMV_CONFIG
        fp8_variant $i "$v" "^linear|^_($ROWS) |^fp8_gemv"
      done
      unset TRTDIST_STREAM_GEMV TRTDIST_PDL_EARLY TRTDIST_STREAM_GEMV_CONFIG
      bench bf16_b1 $M $B
      ;;
    s17a)  # the streaming GEMV (kernels/fp8_gemv_stream.cu): its GPU tests (and the CUDA
      # GEMV's, whose source shares its new header), the per-shape / layer-chain bench, then
      # FP8 batch-1 timelines and TPOT with TRTDIST_STREAM_GEMV off / on, bf16 once
      export BENCH_TIMEOUT=240
      run_tests s17a 300 -n 4 -m gpu tests/test_fp8_gemv_stream.py tests/test_fp8_gemv_cuda.py
      timeout 400 python3 scripts/bench_fp8_gemv_stream.py --output "$OUT/stream.json" 2>&1 \
          | grep -a -v "warning\|Remark" | tee "$OUT/stream.log" | tail -40 | tee -a "$SUMMARY"
      ROWS="rms_norm_quant_kernel|silu_mul_quant|rotary_and_cache_kernel|decode_partial|decode_reduce"
      batch1_ab TRTDIST_STREAM_GEMV 0 1 "^linear|^_($ROWS)|^fp8_gemv" fp8
      bench bf16_b1 llama3-8b --dummy-weights --dtype bfloat16 --num-requests 1 \
          --input-len 128 --output-len 256
      ;;
    s16r)  # the review: shared device helpers (kernels/cuda_common.cuh, NVRTC include path):
      # the CUDA GEMV's and the decode step's GPU tests
      run_tests s16r 400 -m gpu tests/test_fp8_gemv_cuda.py tests/test_fp8_decode_step.py
      ;;
    s16c|s16d)  # the decode step with scales through TMA, keys loaded before the qkv phase, a
      # two-round-trip merge (s16c: refused at 224 registers; s16d: 168): GPU tests, standalone bench with stamps, then
      # batch 1 FP8 step / loop and bf16 in the engine
      export BENCH_TIMEOUT=240
      timeout 300 python3 -m pytest -q -s -m gpu tests/test_fp8_decode_step.py 2>&1 \
          | tee "$OUT/${phase}_tests.log" | grep -E "^seq_len|^FAILED|^E  " | cut -c1-200 | tee -a "$SUMMARY"
      note "$phase tests: $(tail -1 "$OUT/${phase}_tests.log")"
      timeout 300 python3 scripts/bench_decode_step.py --context 384 \
          --configs 2048:1:0:32 1024:2:0:32 2048:1:0:16 \
          --output "$OUT/decode_step.json" 2>&1 | grep -a -v "warning\|^ *^\|float d0\|Remark\|^$" \
          | tee "$OUT/decode_step.log" | tail -12 | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      TRTDIST_DECODE_STEP=1 bench fp8_b1_step $M --quant fp8 $B
      TRTDIST_DECODE_STEP=0 bench fp8_b1_loop $M --quant fp8 $B
      bench bf16_b1 $M $B
      ;;
    s16b)  # the decode step: its GPU tests (errors against the dequantized twin printed),
      # then the standalone bench with per-CTA stamps of one layer, over launch configs
      timeout 300 python3 -m pytest -q -s -x -m gpu tests/test_fp8_decode_step.py 2>&1 \
          | tee "$OUT/s16b_tests.log" | grep -E "^seq_len|^FAILED|^E  " | cut -c1-200 | tee -a "$SUMMARY"
      note "s16b tests: $(tail -1 "$OUT/s16b_tests.log")"
      timeout 300 python3 scripts/bench_decode_step.py --context 384 \
          --configs 1024:2:0:128 2048:1:0:128 1024:4:0:128 1024:2:6:128 \
          --output "$OUT/decode_step.json" 2>&1 | tee "$OUT/decode_step.log" | tail -16 \
          | tee -a "$SUMMARY"
      ;;
    s16a)  # the one-launch batch-1 decode step (on by default when s16a ran; opt-in since): its GPU tests, then batch 1 FP8 with it on /
      # off and bf16, after a warm-up run
      export BENCH_TIMEOUT=240
      run_tests s16a 300 -x -m gpu tests/test_fp8_decode_step.py
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench warm $M --quant fp8 --num-requests 8 --input-len 128 --output-len 32
      TRTDIST_DECODE_STEP=1 bench fp8_b1_step $M --quant fp8 $B
      TRTDIST_DECODE_STEP=0 bench fp8_b1_loop $M --quant fp8 $B
      bench bf16_b1 $M $B
      TRTDIST_DECODE_STEP=1 bench fp8_b1_step_again $M --quant fp8 $B
      ;;
    s15e)  # batch 1 at the session's final code (the bf16-cache decode now pipelined at 3
      # stages): FP8, bf16, FP8 again, after a warm-up run
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench warm $M --quant fp8 --num-requests 8 --input-len 128 --output-len 32
      bench fp8_b1 $M --quant fp8 $B
      bench bf16_b1 $M $B
      bench fp8_b1_again $M --quant fp8 $B
      ;;
    s15d)  # the prefill kernel before (scripts/_baseline_triton_attention.py) / after the block
      # ids a tile ahead, twice over, FP8 cache at 32-token pages and bf16 at 16. The "before"
      # file was this kernel at 139b8b9 (carried as scripts/_baseline_triton_attention.py then)
      S=scripts/sweep_decode_pipeline.py; BASE=/tmp/_baseline_triton_attention.py
      git show 139b8b9:kernels/triton_attention.py > $BASE || note "s15d needs the git history"
      for round in 1 2; do
        for kv in "fp8 32" "bf16 16"; do
          set -- $kv
          timeout 200 python3 $S --kv $1 --block-size $2 --prefill-configs 128:64:8:3 \
              --kernels-file $BASE --tag "before " 2>&1 | grep -E "TFLOP|Error" | tee -a "$SUMMARY"
          timeout 200 python3 $S --kv $1 --block-size $2 --prefill-configs 128:64:8:3 \
              --tag "after " 2>&1 | grep -E "TFLOP|Error" | tee -a "$SUMMARY"
        done
      done
      ;;
    s15c)  # block ids a tile ahead in every paged loop (decode: bf16 caches at 3 stages; the
      # prefill's cached-prefix and FP8 loops): GPU tests, prefill TFLOP/s before (the kernel
      # at 139b8b9) / after over launch configs, then the engine before / after: 1024 x
      # 128/128 FP8 (bf16 cache) and 1000/1000 FP8 + FP8 KV
      run_tests s15c 400 -n 4 -m gpu tests/test_triton_attention.py tests/test_kv_fp8.py \
          tests/test_fp8.py
      S=scripts/sweep_decode_pipeline.py; BASE=/tmp/_baseline_triton_attention.py
      git show 139b8b9:kernels/triton_attention.py > $BASE || note "s15c needs the git history"
      timeout 200 python3 $S --kv fp8 --block-size 32 --prefill-configs 128:64:8:3 \
          --kernels-file $BASE --tag "before " 2>&1 | grep -E "TFLOP" | tee -a "$SUMMARY"
      timeout 300 python3 $S --kv fp8 --block-size 32 --prefill-configs \
          128:64:8:3,128:32:8:3,128:64:8:4,64:32:4:3,64:64:4:3 --tag "after " 2>&1 \
          | grep -E "TFLOP" | tee -a "$SUMMARY"
      timeout 200 python3 $S --kv bf16 --block-size 16 --prefill-configs 128:64:8:3 \
          --kernels-file $BASE --tag "before " 2>&1 | grep -E "TFLOP" | tee -a "$SUMMARY"
      timeout 200 python3 $S --kv bf16 --block-size 16 --prefill-configs 128:64:8:3 \
          --tag "after " 2>&1 | grep -E "TFLOP" | tee -a "$SUMMARY"
      M="llama3-8b --dummy-weights --dtype bfloat16"
      bench warm $M --quant fp8 --num-requests 64 --input-len 128 --output-len 32
      cp kernels/triton_attention.py /tmp/ta_new.py
      for v in before after; do
        if [ $v = before ]; then cp $BASE kernels/triton_attention.py
        else cp /tmp/ta_new.py kernels/triton_attention.py; fi
        bench "r1024_$v" $M --quant fp8 --num-requests 1024 --input-len 128 --output-len 128 \
            --max-batch-size 1024
        bench "long_$v" $M --quant fp8 --kv-cache-dtype fp8 --num-requests 1024 \
            --input-len 1000 --output-len 1000 --max-batch-size 1024
      done
      cp /tmp/ta_new.py kernels/triton_attention.py
      ;;
    s15b)  # (code at 3926b9e; the switch is now `_decode_config`'s fourth field and the
      # sweep's configs take BLOCK_N:warps:stages:ahead) the decode kernel's block-table load
      # one tile ahead (TRTDIST_DECODE_TABLE_AHEAD), so
      # Triton's pipeliner multi-buffers the K / V copies: attention GPU tests with it on, then
      # launch configs off / on, FP8 cache at 32-token pages and bf16 at 16
      TRTDIST_DECODE_TABLE_AHEAD=1 run_tests s15b 300 -n 4 -m gpu tests/test_triton_attention.py \
          tests/test_kv_fp8.py
      timeout 300 python3 scripts/sweep_decode_pipeline.py --kv fp8 --block-size 32 \
          --configs 128:4:3:0:0,128:4:3:0:1,64:4:3:128:1,64:4:4:128:1,64:4:3:0:1,128:4:4:0:1 \
          --output "$OUT/pipe_fp8.json" 2>&1 | grep -E "of copy|^copy" | tee -a "$SUMMARY"
      timeout 300 python3 scripts/sweep_decode_pipeline.py --kv bf16 --block-size 16 \
          --configs 64:4:2:0:0,64:4:3:0:1,64:4:4:0:1,32:4:4:0:1,64:4:3:128:1 \
          --output "$OUT/pipe_bf16.json" 2>&1 | grep -E "of copy|^copy" | tee -a "$SUMMARY"
      ;;
    s15a)  # (code at 139b8b9; the switch is removed) (a) the FP8-cache decode kernel with a sequence's KV heads launched side by side
      # (grid (Hkv, S, P), TRTDIST_DECODE_HEAD_FASTEST) against (S, Hkv, P): attention GPU
      # tests with it on, kernel fractions of copy off / on, 32-token pages; (b) batch-1
      # timelines with decode graphs captured at max_model_len 256 (one decode partition, no
      # merge kernel) against 8192 (32 partitions + merge), both dtypes
      TRTDIST_DECODE_HEAD_FASTEST=1 run_tests s15a 300 -n 4 -m gpu tests/test_triton_attention.py \
          tests/test_kv_fp8.py
      for v in 0 1 0 1; do
        TRTDIST_DECODE_HEAD_FASTEST=$v timeout 200 python3 scripts/sweep_fp8_decode.py \
            --block-sizes 32,64 --configs 128:4:3 --output "$OUT/hf_$v.json" 2>&1 \
            | grep -E "of copy" | sed "s/^/head_fastest=$v /" | tee -a "$SUMMARY"
        TRTDIST_DECODE_HEAD_FASTEST=$v timeout 200 python3 scripts/bench_kernels.py \
            --only "decode b" --output "$OUT/hf_kernels_$v.json" 2>&1 | grep -E "^decode" \
            | sed "s/^/head_fastest=$v /" | tee -a "$SUMMARY"
      done
      ROWS="decode_partial|decode_reduce|rotary_and_cache_kernel"
      for q in fp8 none; do
        for mml in 8192 256; do
          timeout 150 python3 scripts/profile_decode.py --batch 1 --context 128 --steps 24 \
              --quant $q --max-model-len $mml --timeline "$OUT/timeline_${q}_$mml.json" \
              > "$OUT/timeline_${q}_$mml.log" 2>&1
          note "timeline $q max_model_len $mml: $(grep wall_ms "$OUT/timeline_${q}_$mml.log" | cut -c1-70)"
          grep -E "^linear|^_($ROWS) " "$OUT/timeline_${q}_$mml.log" | tee -a "$SUMMARY"
        done
      done
      ;;
    s14e)  # (code at the commit that added this phase, removed: no clear gain) the decode
      # GEMVs triggering the next launch right after their wait (the next
      # kernel is a one-program row kernel): GPU tests with it on, FP8 timelines off / on,
      # TPOT of both dtypes off / on
      TRTDIST_GEMV_EARLY_TRIGGER=1 run_tests s14e 300 -n 4 -m gpu tests/test_gemv.py \
          tests/test_fp8_gemv_cuda.py tests/test_fp8_kernels.py tests/test_row_amax.py
      ROWS="rms_norm_quant_kernel|silu_and_mul_kernel|rotary_and_cache_kernel|decode_partial"
      batch1_ab TRTDIST_GEMV_EARLY_TRIGGER 0 1 "^linear|^_($ROWS) " fp8 bf16
      ;;
    s14b)  # issue 12's three goals at this session's final code: 1000/1000 FP8 + FP8 KV
      # (defaults), 1024 x 128/128 FP8, batch 1 FP8 / bf16 / FP8 again
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      bench warm $M --quant fp8 --kv-cache-dtype fp8 --num-requests 64 --input-len 128 \
          --output-len 32
      bench long $M --quant fp8 --kv-cache-dtype fp8 --num-requests 1024 --input-len 1000 \
          --output-len 1000 --max-batch-size 1024
      bench fp8_r1024 $M --quant fp8 --num-requests 1024 --input-len 128 --output-len 128 \
          --max-batch-size 1024
      bench fp8_b1 $M --quant fp8 $B
      bench bf16_b1 $M $B
      bench fp8_b1_again $M --quant fp8 $B
      ;;
    s14a)  # the next weight's head prefetched into L2 from each decode GEMV's tail (code at
      # c252481, removed after this phase measured it slower): GPU tests, batch-1 timelines
      # (FP8, without and with), TPOT of both dtypes without / with
      run_tests s14a 300 -n 4 -m gpu tests/test_l2_prefetch.py tests/test_gemv.py \
          tests/test_fp8_gemv_cuda.py
      bench warm llama3-8b --dummy-weights --dtype bfloat16 --quant fp8 --num-requests 8 \
          --input-len 128 --output-len 32
      batch1_ab TRTDIST_L2_NEXT 0 1 "^linear" fp8 bf16
      M="llama3-8b --dummy-weights --dtype bfloat16"
      B="--num-requests 1 --input-len 128 --output-len 256"
      TRTDIST_L2_NEXT=o=all,qkv=16,gate_up=16,down=8,lm_head=16 bench fp8_b1_more $M --quant fp8 $B
      ;;
    s13e)  # two GPUs (nvidia-h200-x2): the batching runtime's mpirun tests over NCCL, swap
      # preemption at (tp, pp) = (2, 1) and (1, 2) among them, against transformers
      run_tests s13e 560 tests/test_runtime.py tests/test_block_table.py
      ;;
    s13f)  # one GPU: swap preemption in the engine (pinned slots, CUDA graphs, overlap)
      # against transformers, and the batching runtime's other one-rank tests
      run_tests s13f 400 tests/test_runtime.py tests/test_swap.py
      ;;
    s12i)  # the session's last code: the FP8 GEMM / fused / row-amax GPU tests (a
      # register-capped tile among them)
      timeout 400 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_kernels.py \
          tests/test_fp8_gemv_cuda.py tests/test_fp8_fused.py tests/test_row_amax.py 2>&1 \
          | tee "$OUT/s12i_tests.log" | grep -E "^FAILED|^E  |passed|failed" | cut -c1-300 | head -20
      note "s12i gpu tests: $(tail -1 "$OUT/s12i_tests.log")"
      ;;
    s12r)  # after the review (split plan and launch options shared with the benches): the
      # FP8 GPU tests and the chained benches on down
      timeout 400 python3 -m pytest -q -rf -m gpu -n 4 tests/test_fp8_kernels.py \
          tests/test_fp8_gemv_cuda.py tests/test_fp8_fused.py tests/test_row_amax.py 2>&1 \
          | tee "$OUT/s12r_tests.log" | grep -E "^FAILED|^E  " | cut -c1-300 | head -20
      note "s12r gpu tests: $(tail -1 "$OUT/s12r_tests.log")"
      timeout 200 python3 scripts/bench_split_gemv.py --set capped --shapes down \
          --output "$OUT/cap_down.json" 2>&1 | grep -E "^====|\|" | tee -a "$SUMMARY"
      timeout 200 python3 scripts/bench_fp8_gemv_cuda.py --shapes o --output "$OUT/cuda_o.json" \
          --best "$OUT/cuda_o_best.json" 2>&1 | tail -2 | tee -a "$SUMMARY"
      ;;
    *) note "unknown phase $phase";;
  esac
done
# the device tool returns at most 8 files: pack everything into one
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
echo "==== summary"; cat "$SUMMARY"
