#!/usr/bin/env bash
# Every figure benchmarks/RESULTS.md needs from one machine, in one run: the machine card,
# bench_sync (what one host sync costs, and the host's work after a wait), bench_upload,
# bench_decode --runs 3 at both shapes, profile_decode (host time by phase; at the Qwen3-30B-A3B
# routing also replayed with the model's compute taken out), the early launch, the launch first, the hits computed
# while misses load (and only from half the experts resident), the ranks sorted on the device,
# the governor timing decode steps, each off and on (bench_switches --interleave), experts
# packed one read each against stacked (golem-pack), a cProfile of a
# depth-0 decode, golem-run --demo, and the test suite. On a lent GPU, from the repository root:
#     OUT=/tmp/out ../shared/gpu/run.sh bash benchmarks/gpu_check.sh
# On a CPU, to check the script itself in a few minutes:
#     bash benchmarks/gpu_check.sh --small
# Within a 15-minute device loan (start-up and first-use kernel builds included), the figures
# that decide what is open first, at about 14 minutes of step limits (bench_decode last):
#     bash benchmarks/gpu_check.sh --quick
# Each step has its own time limit and a failed step does not stop the next; the exit status
# is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
SMALL=0
QUICK=0
[ "${1:-}" = "--small" ] && SMALL=1
[ "${1:-}" = "--quick" ] && QUICK=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
failed=0

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s)"
  echo "\$ $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

echo "=== machine"
date -u +"date: %Y-%m-%d %H:%M UTC"
uname -srm
nproc | sed 's/^/cpus: /'
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
fi
"$PY" - <<'EOF'
import mlx.core as mx, mlx_lm, platform
print("python", platform.python_version(), "| mlx", mx.__version__, "| mlx-lm", mlx_lm.__version__)
print("default device", mx.default_device(), "| metal", mx.metal.is_available(),
      "| cuda", mx.cuda.is_available() if hasattr(mx, "cuda") else "n/a")
from golem.runtime.writers import default_writer
print("default slot writer", default_writer())
EOF
git log -1 --format="commit %h %s" 2>/dev/null || true

if [ $QUICK -eq 1 ]; then
  # the steps most likely to finish first: a step past its limit stops, the next one runs
  step "bench_sync (one host sync and one launch, apart from their work)" 30 "$PY" benchmarks/bench_sync.py --rounds 3 --calls 100
  step "profile_decode, Qwen3-30B-A3B routing, and replayed without the model" 180 "$PY" benchmarks/profile_decode.py --shape qwen3-30b-a3b-host --runs 1 --tokens 16 --rows warm_resident,disk_depth0,disk_depth2,oracle --replay
  step "early launch (share 0.25), interleaved" 120 "$PY" benchmarks/bench_switches.py --switch early-launch --interleave --shape small --runs 3 --tokens 12 --rows warm_resident,disk_depth0,depth2
  step "early launch of every decode layer, interleaved" 120 "$PY" benchmarks/bench_switches.py --switch early-launch --interleave --early 1.0 --shape small --runs 3 --tokens 12 --rows disk_depth0,depth2
  step "launch first, interleaved" 90 "$PY" benchmarks/bench_switches.py --switch launch-first --interleave --shape small --runs 3 --tokens 12 --rows warm_resident,disk_depth0,depth2
  step "hits while misses load, from half resident, interleaved" 90 "$PY" benchmarks/bench_switches.py --switch overlap-share --interleave --shape small --runs 3 --tokens 12 --rows disk_depth0,depth0
  step "packed experts (golem-pack), alternating loads" 90 "$PY" benchmarks/bench_switches.py --switch packed-experts --runs 2 --tokens 16 --rows disk_depth0,disk_depth2
  step "bench_upload" 60 "$PY" benchmarks/bench_upload.py --runs 3 --sizes-mb 1 16 --batches 1 8
  step "golem-run --demo" 60 golem-run --demo
  step "bench_decode" 180 "$PY" benchmarks/bench_decode.py --runs 1
  echo
  echo "=== done: $failed failed step(s)"
  exit $failed
fi

if [ $SMALL -eq 1 ]; then
  step "bench_sync" 60 "$PY" benchmarks/bench_sync.py --rounds 3 --calls 50
  step "bench_upload" 300 "$PY" benchmarks/bench_upload.py --runs 3 --sizes-mb 1 --batches 1 8 --slots 16
  step "bench_decode" 900 "$PY" benchmarks/bench_decode.py --runs 1 --tokens 6
  step "profile_decode" 600 "$PY" benchmarks/profile_decode.py --runs 1 --tokens 6 --rows disk_depth0,depth2,default
  PROFILE_TOKENS=6
  SUITE="tests/test_writers.py tests/test_engine.py"
else
  step "bench_sync" 60 "$PY" benchmarks/bench_sync.py
  step "bench_upload" 300 "$PY" benchmarks/bench_upload.py --runs 7
  step "bench_decode" 600 "$PY" benchmarks/bench_decode.py --runs 3
  step "bench_decode, host slot writer" 300 "$PY" benchmarks/bench_decode.py --runs 1 --slot-writer host
  step "bench_decode, Qwen3-30B-A3B slice" 600 "$PY" benchmarks/bench_decode.py --shape qwen3-30b-a3b --runs 3
  step "profile_decode" 400 "$PY" benchmarks/profile_decode.py --runs 3
  step "profile_decode, Qwen3-30B-A3B routing, replayed without the model, calls counted (the CUDA path splits hits from misses by another rule)" 400 "$PY" benchmarks/profile_decode.py --shape qwen3-30b-a3b-host --runs 2 --tokens 16 --rows warm_resident,disk_depth0,depth0,depth2,oracle --replay --calls
  step "profile_decode, Qwen3-30B-A3B slice" 500 "$PY" benchmarks/profile_decode.py --shape qwen3-30b-a3b --runs 1
  step "early launch, interleaved" 400 "$PY" benchmarks/bench_switches.py --switch early-launch --interleave --shape small --runs 6 --rows warm_resident,disk_depth0,depth0
  step "early launch of every decode layer, interleaved" 400 "$PY" benchmarks/bench_switches.py --switch early-launch --interleave --early 1.0 --shape small --runs 6 --rows disk_depth0,depth0,depth2
  step "launch first, interleaved" 400 "$PY" benchmarks/bench_switches.py --switch launch-first --interleave --shape small --runs 6 --rows warm_resident,disk_depth0,depth0,depth2
  step "hits while misses load, interleaved" 400 "$PY" benchmarks/bench_switches.py --switch overlap --interleave --shape small --runs 6 --rows disk_depth0,depth0,depth2
  step "hits while misses load, from half resident, interleaved" 400 "$PY" benchmarks/bench_switches.py --switch overlap-share --interleave --shape small --runs 6 --rows disk_depth0,depth0,depth2
  step "hits while misses load, from 256 KiB resident, interleaved" 300 "$PY" benchmarks/bench_switches.py --switch overlap-size --interleave --runs 6 --tokens 16 --rows disk_depth0,depth0,depth2
  step "ranking that keeps the interpreter lock, interleaved" 300 "$PY" benchmarks/bench_switches.py --switch held-lock-ranking --interleave --runs 6 --tokens 16
  step "ranks sorted on the device, interleaved" 300 "$PY" benchmarks/bench_switches.py --switch device-ranks --interleave --runs 6 --tokens 16
  step "packed experts (golem-pack), alternating loads" 400 "$PY" benchmarks/bench_switches.py --switch packed-experts --runs 4 --tokens 16
  step "governor timing decode steps, interleaved" 400 "$PY" benchmarks/bench_switches.py --switch timed-governor --interleave --runs 6 --rows disk_depth0,disk_governed2,disk_default,depth0,depth1,governed2,default
  step "where the engine lets the interpreter lock go" 200 "$PY" benchmarks/profile_gil.py --rows disk_depth0,disk_depth2
  PROFILE_TOKENS=24
  SUITE="tests/test_writers.py tests/test_engine.py tests/test_governor.py tests/test_equivalence.py tests/test_prefetch.py tests/test_options.py tests/test_memory.py tests/test_runtime_errors.py"
fi

step "cProfile, depth 0, 12 slots, top 20 by own time" 300 "$PY" - "$PROFILE_TOKENS" <<'EOF'
import cProfile, pstats, sys
sys.path.insert(0, "benchmarks")
from bench_decode import build, decode, prompt_ids
from mlx_lm.utils import load_tokenizer
from golem.runtime import load
from golem.runtime.synthetic import default_cache_dir

tokens = int(sys.argv[1])
path = build(default_cache_dir(), "small")
prompts = prompt_ids(load_tokenizer(path))
with load(str(path), cache_sizes=12) as (model, _):
    decode(model, prompts[:1], 4)  # warm-up
    profile = cProfile.Profile()
    profile.enable()
    seconds, n, _ = decode(model, prompts, tokens)
    profile.disable()
    st = model.golem.engine.stats
    us = st.host_us()
    print(f"{n / seconds:.2f} tok/s; misses/token {st.decode_misses / max(st.decode_steps, 1):.2f}; "
          f"host us per miss {us['per_miss_us']:.0f}, upload us per miss {us['write_per_miss_us']:.0f}, "
          f"engine us per layer {us['per_layer_us']:.0f}, sync us per layer {us['sync_per_layer_us']:.0f}")
pstats.Stats(profile).sort_stats("tottime").print_stats(20)
EOF

step "golem-run --demo" 300 golem-run --demo
step "test suite ($SUITE)" 900 "$PY" -m pytest -q -x $SUITE

echo
echo "=== done: $failed failed step(s)"
exit $failed
