#!/usr/bin/env bash
# llama.cpp as the external reference for the native engine: builds it, benchmarks it.
#
#   scripts/llamacpp.sh build                 # build (once) and print the bin dir
#   scripts/llamacpp.sh bench [--threads N] [--model GGUF] [--reps R]
#                                             # print ONE JSON object on stdout (below)
#   scripts/llamacpp.sh python ARGS...        # run python with the llama-cpp-python
#                                             # bindings loaded against this build
#   scripts/llamacpp.sh version               # print the llama.cpp version string
#
# Source: the llama-cpp-python==0.3.36 sdist from PyPI (a package registry; sha256
# pinned below). It vendors llama.cpp at ggml-org/llama.cpp@0c1e57098 (ggml 0.25.3).
# cmake and ninja also come from PyPI, into a venv in the cache. Only the targets
# llama-bench, llama-batched-bench and llama-simple (plus the shared libllama/libggml
# the python bindings load) are built: Release, GGML_NATIVE=ON (-march=native), no
# OpenMP (ggml's own thread pool: exactly -t threads, honours --poll), no GPU backends.
# That takes 10-17 minutes on 2 cores (17 min 04 s measured on a busy box). Everything lives in
# ${DYNAMO_CACHE:-$HOME/.cache/dynamo}/llamacpp/, nothing in the repository. A build
# is reused while its stamp (source sha256 + flags) matches; it is safe to run
# concurrently (flock).
#
# bench output (stdout, one line; every log goes to stderr):
#   {"version": str, "threads": int,
#    "prefill_tok_s": float,      # llama-bench pp512 tok/s, median of --reps (5)
#    "decode_tok_s": float,       # llama-bench tg64 tok/s (empty context), median of --reps
#    "batched_decode_tok_s": {"1": f, "2": f, "4": f, "8": f, "16": f},
#                                 # llama-batched-bench S_TG tok/s (all sequences together),
#                                 # npp 32, ntg 32, per npl; median of min(reps,3) runs
#    "prefill_1000_ms": float}    # llama-bench pp1000: ms to prefill a 1000-token prompt
#                                 # (TTFT without sampling/HTTP); median of min(reps,3)
# One bench takes ~1.5 minutes at --threads 1 on this model. Models other than the
# default (scripts/fetch-model.sh) can be given with --model or DYNAMO_MODEL_GGUF.
set -euo pipefail

SDIST_SPEC="llama-cpp-python==0.3.36"
SDIST_NAME="llama_cpp_python-0.3.36"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT="0c1e57098bba43ac29e6e3b677cdceebdd22334f"
TOOL_PKGS=(cmake==4.4.4 ninja==1.13.2)
# Runtime dependencies of the llama_cpp python package (for `python`).
PY_PKGS=(numpy==2.4.6 diskcache==5.6.3 jinja2==3.1.6 typing-extensions==4.16.0)
TARGETS=(llama-bench llama-batched-bench llama-simple llama)
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DGGML_NATIVE=ON
    -DGGML_OPENMP=OFF
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON
)

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${DYNAMO_CACHE:-$HOME/.cache/dynamo}"
ROOT="$CACHE/llamacpp"
VENV="$ROOT/venv"
SRC="$ROOT/src/$SDIST_NAME"
BUILD="$ROOT/build"
BIN="$BUILD/bin"
STAMP="$ROOT/build.stamp"

die() {
    echo "llamacpp: error: $*" >&2
    exit 1
}
log() { echo "llamacpp: $*" >&2; }

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit 2
}

stamp_key() {
    printf '%s\n' "$SDIST_SHA256" "${CMAKE_FLAGS[@]}" "${TARGETS[@]}" "${TOOL_PKGS[@]}" "${PY_PKGS[@]}"
}

sha256_of() {
    python3 - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
EOF
}

is_built() {
    [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(stamp_key)" ]] || return 1
    local t
    for t in llama-bench llama-batched-bench llama-simple; do [[ -x "$BIN/$t" ]] || return 1; done
    [[ -f "$BIN/libllama.so" ]] || return 1
    [[ -x "$VENV/bin/python" ]] || return 1
}

do_build() {
    mkdir -p "$ROOT" || die "cannot create $ROOT"
    exec 9>"$ROOT/.lock"
    flock 9 || die "cannot lock $ROOT/.lock"
    if is_built; then
        echo "$BIN"
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is required"
    command -v c++ >/dev/null 2>&1 || die "a C++ compiler (c++) is required (apt-get install g++)"
    command -v cc >/dev/null 2>&1 || die "a C compiler (cc) is required (apt-get install gcc)"
    local t0=$SECONDS
    rm -f "$STAMP"

    # 1. tools venv (cmake, ninja, and the bindings' runtime deps), all from PyPI.
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating $VENV"
        python3 -m venv "$VENV" >&2 || die "python3 -m venv failed (install python3-venv)"
    fi
    log "installing ${TOOL_PKGS[*]} ${PY_PKGS[*]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "${TOOL_PKGS[@]}" "${PY_PKGS[@]}" >&2 \
        || die "pip install of cmake/ninja/numpy failed (is PyPI reachable? PIP_INDEX_URL sets an index)"

    # 2. the sdist. --no-binary only for this package and --no-deps: with
    # `--no-binary :all:` pip would build cmake itself from source.
    local tarball="$ROOT/$SDIST_NAME.tar.gz"
    if [[ ! -f "$tarball" ]] || [[ "$(sha256_of "$tarball")" != "$SDIST_SHA256" ]]; then
        local tmp
        tmp="$(mktemp -d "${TMPDIR:-/tmp}/dynamo-llamacpp.XXXXXX")"
        log "downloading $SDIST_SPEC (sdist, ~77 MB) from PyPI"
        "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check \
            --no-deps --no-binary llama-cpp-python "$SDIST_SPEC" -d "$tmp" >&2 \
            || { rm -rf "$tmp"; die "pip download $SDIST_SPEC failed (is PyPI reachable?)"; }
        [[ -f "$tmp/$SDIST_NAME.tar.gz" ]] || { rm -rf "$tmp"; die "pip did not produce $SDIST_NAME.tar.gz"; }
        local got
        got="$(sha256_of "$tmp/$SDIST_NAME.tar.gz")"
        if [[ "$got" != "$SDIST_SHA256" ]]; then
            rm -rf "$tmp"
            die "$SDIST_NAME.tar.gz has sha256 $got, expected $SDIST_SHA256; refusing to build it"
        fi
        mv -f "$tmp/$SDIST_NAME.tar.gz" "$tarball"
        rm -rf "$tmp"
    fi
    log "unpacking $SDIST_NAME"
    rm -rf "$ROOT/src"
    mkdir -p "$ROOT/src"
    tar -xzf "$tarball" -C "$ROOT/src" || die "cannot unpack $tarball"
    [[ -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]] || die "$SRC/vendor/llama.cpp is missing from the sdist"

    # 3. cmake + ninja.
    local cmake="$VENV/bin/cmake"
    rm -rf "$BUILD"
    log "configuring llama.cpp ($LLAMA_CPP_COMMIT) in $BUILD"
    "$cmake" -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" "${CMAKE_FLAGS[@]}" >&2 \
        || die "cmake configure failed (see above)"
    log "building ${TARGETS[*]} with $(nproc) jobs (10-17 minutes on 2 cores)"
    "$cmake" --build "$BUILD" --parallel "$(nproc)" --target "${TARGETS[@]}" >&2 \
        || die "llama.cpp build failed (see above)"
    for t in llama-bench llama-batched-bench llama-simple; do
        [[ -x "$BIN/$t" ]] || die "build finished but $BIN/$t is missing"
    done
    [[ -f "$BIN/libllama.so" ]] || die "build finished but $BIN/libllama.so is missing"
    stamp_key >"$STAMP"
    log "built in $((SECONDS - t0)) s"
    echo "$BIN"
}

version_string() {
    echo "llama.cpp ${LLAMA_CPP_COMMIT:0:9} (vendored in llama-cpp-python 0.3.36, ggml 0.25.3; Release, GGML_NATIVE=ON, no OpenMP, CPU)"
}

ensure_built() {
    if ! is_built; then
        log "llama.cpp is not built yet; building it first"
        do_build >/dev/null
    fi
}

do_bench() {
    local threads=1 model="${DYNAMO_MODEL_GGUF:-}" reps=5
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --threads | -t) threads="${2:?--threads needs a value}"; shift 2 ;;
            --threads=*) threads="${1#*=}"; shift ;;
            --model | -m) model="${2:?--model needs a value}"; shift 2 ;;
            --model=*) model="${1#*=}"; shift ;;
            --reps | -r) reps="${2:?--reps needs a value}"; shift 2 ;;
            --reps=*) reps="${1#*=}"; shift ;;
            -h | --help) usage ;;
            *) die "bench: unknown argument '$1'" ;;
        esac
    done
    [[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "bench: --threads must be a positive integer, got '$threads'"
    [[ "$reps" =~ ^[1-9][0-9]*$ ]] || die "bench: --reps must be a positive integer, got '$reps'"
    if [[ -z "$model" ]]; then
        model="$("$SCRIPT_DIR/fetch-model.sh")" || die "cannot fetch the model (scripts/fetch-model.sh)"
    fi
    [[ -f "$model" ]] || die "model not found: $model"
    ensure_built

    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/dynamo-llamacpp-bench.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT

    log "llama-bench: pp512, tg64; -t $threads -r $reps (load avg: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$BIN/llama-bench" -m "$model" -t "$threads" -r "$reps" -p 512 -n 64 -o json \
        >"$tmp/bench.json" 2>"$tmp/bench.err" \
        || { cat "$tmp/bench.err" >&2; die "llama-bench failed"; }

    local reps1000=$((reps < 3 ? reps : 3))
    log "llama-bench: pp1000; -t $threads -r $reps1000"
    "$BIN/llama-bench" -m "$model" -t "$threads" -r "$reps1000" -p 1000 -n 0 -o json \
        >"$tmp/bench1000.json" 2>"$tmp/bench.err" \
        || { cat "$tmp/bench.err" >&2; die "llama-bench (pp1000) failed"; }

    local breps=$((reps < 3 ? reps : 3)) i
    for ((i = 1; i <= breps; i++)); do
        log "llama-batched-bench ($i/$breps): npp 32, ntg 32, npl 1,2,4,8,16; -t $threads"
        "$BIN/llama-batched-bench" -m "$model" -t "$threads" -tb "$threads" -c 2048 -b 2048 -ub 512 \
            -npp 32 -ntg 32 -npl 1,2,4,8,16 --output-format jsonl \
            >>"$tmp/batched.out" 2>&1 \
            || { cat "$tmp/batched.out" >&2; die "llama-batched-bench failed"; }
    done

    python3 - "$tmp/bench.json" "$tmp/bench1000.json" "$tmp/batched.out" "$threads" "$(version_string)" <<'EOF' \
        || die "cannot parse the llama.cpp output"
import json, statistics, sys

bench_path, bench1000_path, batched_path, threads, version = sys.argv[1:]
threads = int(threads)
tests = json.load(open(bench_path)) + json.load(open(bench1000_path))

def find(n_prompt, n_gen):
    for t in tests:
        if t["n_prompt"] == n_prompt and t["n_gen"] == n_gen:
            return t
    sys.exit(f"llama-bench output has no test with n_prompt={n_prompt} n_gen={n_gen}")

# Medians, not llama-bench's mean: on a shared machine one disturbed sample skews a mean.
pp512, pp1000, tg64 = find(512, 0), find(1000, 0), find(0, 64)
med = {}
for name, t in (("pp512", pp512), ("pp1000", pp1000), ("tg64", tg64)):
    med[name] = statistics.median(float(x) for x in t["samples_ts"])
    print(f"llamacpp:   {name:7s} median {med[name]:8.2f} tok/s (mean {t['avg_ts']:.2f}, stddev "
          f"{t['stddev_ts']:.2f}; samples " + ", ".join(f"{x:.1f}" for x in t["samples_ts"]) + ")",
          file=sys.stderr)
    if t["n_threads"] != threads:
        sys.exit(f"llama-bench ran {name} with {t['n_threads']} threads, asked for {threads}")

runs = {}
for line in open(batched_path):
    line = line.strip()
    if not line.startswith("{"):
        continue
    row = json.loads(line)
    if "speed_tg" not in row:
        continue
    if row.get("n_threads", threads) != threads:
        sys.exit(f"llama-batched-bench ran with {row['n_threads']} threads, asked for {threads}")
    runs.setdefault(str(row["pl"]), []).append(float(row["speed_tg"]))
want = ["1", "2", "4", "8", "16"]
missing = [k for k in want if k not in runs]
if missing:
    sys.exit(f"llama-batched-bench output lacks npl {missing}")
batched = {k: statistics.median(runs[k]) for k in want}
for k in want:
    print(f"llamacpp:   npl {k:>2s}: S_TG median {batched[k]:8.2f} tok/s (runs "
          + ", ".join(f"{x:.1f}" for x in runs[k]) + ")", file=sys.stderr)

out = {
    "version": version + (f", build {pp512.get('build_commit')}" if pp512.get("build_commit") else ""),
    "threads": threads,
    "prefill_tok_s": round(med["pp512"], 3),
    "decode_tok_s": round(med["tg64"], 3),
    "batched_decode_tok_s": {k: round(batched[k], 3) for k in want},
    "prefill_1000_ms": round(1000.0 * 1000.0 / med["pp1000"], 3),
}
print(json.dumps(out))
EOF
}

do_python() {
    ensure_built
    PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" LLAMA_CPP_LIB_PATH="$BIN" exec "$VENV/bin/python" "$@"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    build) do_build ;;
    bench) do_bench "$@" ;;
    python) do_python "$@" ;;
    version) version_string ;;
    -h | --help | help | "") usage ;;
    *) die "unknown command '$cmd' (build | bench | python | version)" ;;
esac
