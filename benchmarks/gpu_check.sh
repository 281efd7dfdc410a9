#!/usr/bin/env bash
# One round on a Hopper machine: GPU tests, benchmarks, memcheck. Logs go to $LOG_DIR
# (default ./gpu-logs); a short summary is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG_DIR=${LOG_DIR:-${OUT:-gpu-logs}}
mkdir -p "$LOG_DIR"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FLASHMLA_CUTE_CACHE_DIR=${FLASHMLA_CUTE_CACHE_DIR:-/tmp/flashmla_cute_cache}

export FLASHMLA_CUTE_CACHE_DIR=/tmp/flashmla_cute_startup_cache
rm -rf "$FLASHMLA_CUTE_CACHE_DIR"
{ python3 benchmarks/startup.py; python3 benchmarks/startup.py; } > "$LOG_DIR/startup.log" 2>&1
python3 -m pytest tests -q -x -m "${PYTEST_MARK:-gpu}" -p no:cacheprovider > "$LOG_DIR/tests.log" 2>&1
tests_rc=$?
python3 benchmarks/bench_decode.py --cases "${BENCH_CASES:-quick}" --check --json "$LOG_DIR/bench.json" > "$LOG_DIR/bench.log" 2>&1
bench_rc=$?
{ python3 benchmarks/bench_overhead.py; python3 benchmarks/bench_overhead.py; python3 benchmarks/bench_overhead.py --pin; } > "$LOG_DIR/overhead.log" 2>&1
python3 benchmarks/tiny_gpu_time.py > "$LOG_DIR/tiny_gpu_time.log" 2>&1
python3 benchmarks/host_costs.py > "$LOG_DIR/host_costs.log" 2>&1
python3 benchmarks/kernel_times.py > "$LOG_DIR/kernel_times.log" 2>&1
compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitizer_cases.py > "$LOG_DIR/memcheck.log" 2>&1
memcheck_rc=$?

echo "== tests (rc $tests_rc)"; tail -n 15 "$LOG_DIR/tests.log"
echo "== memcheck (rc $memcheck_rc)"; grep -E "ERROR SUMMARY|out finite" "$LOG_DIR/memcheck.log"
echo "== startup (cold cache, then cached)"; cat "$LOG_DIR/startup.log"
echo "== kernel times"; grep -v Warn "$LOG_DIR/kernel_times.log" | tail -n 6
echo "== host costs"; grep -v Warn "$LOG_DIR/host_costs.log" | tail -n 30
echo "== tiny problem, GPU time"; grep -v Warn "$LOG_DIR/tiny_gpu_time.log"
echo "== overhead"; grep -v Warn "$LOG_DIR/overhead.log"
echo "== bench (rc $bench_rc)"; tail -n 25 "$LOG_DIR/bench.log"
