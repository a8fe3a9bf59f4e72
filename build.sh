#!/usr/bin/env bash
# Build and push the opensandbox-ingress image for linux/amd64 and
# linux/arm64 with docker buildx.  See usage() below.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: build.sh [--dry-run] [-h|--help]

Builds the opensandbox-ingress image for linux/amd64 and linux/arm64 with
docker buildx and pushes it (run `docker login` first).

Options:
  --dry-run   print the exact commands instead of running them (or DRY_RUN=1)
  -h, --help  show this help

Environment (defaults in brackets):
  TAG         image tag [latest]; a tag starting with "v" also pushes :latest
  VERSION     build version [git describe --tags --always --dirty, else dev]
  GIT_COMMIT  commit [git rev-parse HEAD, else unknown]
  BUILD_TIME  UTC build time [now, or SOURCE_DATE_EPOCH; %Y-%m-%dT%H:%M:%SZ]
  IMAGES      space-separated image repositories [opensandbox/ingress]
  PLATFORMS   buildx platforms [linux/amd64,linux/arm64]
  BUILDER     buildx builder to use, created if missing [ingress-builder]

Example:
  TAG=local VERSION=1.2.3 GIT_COMMIT=abc BUILD_TIME=2025-01-01T00:00:00Z bash build.sh
EOF
}

DRY_RUN=${DRY_RUN:-0}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# The Dockerfile and the build context are next to this script.
cd "$(dirname "$0")"

utc_time() {
    local fmt="+%Y-%m-%dT%H:%M:%SZ"
    if [[ -n "${SOURCE_DATE_EPOCH:-}" ]]; then
        date -u -d "@${SOURCE_DATE_EPOCH}" "$fmt" 2>/dev/null || date -u -r "${SOURCE_DATE_EPOCH}" "$fmt"
    else
        date -u "$fmt"
    fi
}

TAG=${TAG:-latest}
VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo "dev")}
GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown")}
BUILD_TIME=${BUILD_TIME:-$(utc_time)}
IMAGES=${IMAGES:-opensandbox/ingress}
PLATFORMS=${PLATFORMS:-linux/amd64,linux/arm64}
BUILDER=${BUILDER:-ingress-builder}

# One word, quoted for a POSIX shell only when it needs it (printf %q
# would also escape the comma in linux/amd64,linux/arm64).
quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:,=@%+-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# Print a command, copy-pasteable (dry run), or run it.
run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        local line="" word
        for word in "$@"; do
            line+="${line:+ }$(quote "$word")"
        done
        printf '%s\n' "$line"
    else
        "$@"
    fi
}

if [[ "$DRY_RUN" != 1 ]] && ! docker buildx version >/dev/null 2>&1; then
    echo "build.sh: docker buildx is not available (install the buildx plugin, or use --dry-run)" >&2
    exit 1
fi

tags=()
for image in $IMAGES; do
    tags+=(-t "${image}:${TAG}")
    if [[ "$TAG" == v* ]]; then
        tags+=(-t "${image}:latest")
    fi
done

# A multi-platform build needs a docker-container builder (QEMU or native
# nodes for the foreign platform); reuse it if it exists.
if [[ "$DRY_RUN" == 1 ]]; then
    printf 'docker buildx inspect %s >/dev/null 2>&1 || ' "$(quote "$BUILDER")"
    run docker buildx create --name "$BUILDER" --driver docker-container --bootstrap
elif ! docker buildx inspect "$BUILDER" >/dev/null 2>&1; then
    run docker buildx create --name "$BUILDER" --driver docker-container --bootstrap
fi

run docker buildx build \
    --builder "$BUILDER" \
    --platform "$PLATFORMS" \
    "${tags[@]}" \
    --build-arg VERSION="$VERSION" \
    --build-arg GIT_COMMIT="$GIT_COMMIT" \
    --build-arg BUILD_TIME="$BUILD_TIME" \
    -f Dockerfile \
    --push \
    .
