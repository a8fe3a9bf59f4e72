#!/usr/bin/env bash
# WebSocket conformance: the Autobahn|Testsuite fuzzing client run directly
# against the suite's own conformant echo server, then through a running
# ingress to that same server; prints one DIFF line per case whose verdict
# differs and ends with "K cases differ (of N compared)".
#
# usage: bench/ws_conformance.sh [--cases SET] [--strict] [OUTDIR]
#   SET: full | quick (default) | nocompress | core | comma-separated patterns
#
# Needs the wstest harness (WSTEST_DIR, default ../shared/wstest beside the
# checkout; it needs a pyenv CPython 2.7, see its README). Not part of the
# pytest suite. Exit status: 0 when no case differs, 1 when some do.
set -euo pipefail
cd "$(dirname "$0")/.."

# Beside the checkout, or beside the worktrees' folder (../../shared).
if [ -z "${WSTEST_DIR:-}" ]; then
    WSTEST_DIR=../shared/wstest
    [ -d "$WSTEST_DIR" ] || WSTEST_DIR=../../shared/wstest
fi
ECHO_PORT=${ECHO_PORT:-9001}
INGRESS_PORT=${INGRESS_PORT:-28931}
cases=quick
strict=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cases) cases=$2; shift 2 ;;
        --strict) strict=(--strict); shift ;;
        *) break ;;
    esac
done
outdir=${1:-/tmp/ws-conformance}
mkdir -p "$outdir"

"$WSTEST_DIR/setup.sh" >/dev/null
"$WSTEST_DIR/echo.sh" start "$ECHO_PORT" >/dev/null

sandboxes="$outdir/sandboxes.json"
echo '[{"name": "echo", "endpoint": "127.0.0.1"}]' > "$sandboxes"
python3 -c "from twisted.scripts.twistd import run; run()" -n --pidfile= \
    -l "$outdir/ingress.log" opensandbox-ingress --provider-type file \
    --sandboxes-file "$sandboxes" --mode uri --port "$INGRESS_PORT" \
    --websocket-ping-interval 0 &
ingress=$!
trap 'kill $ingress 2>/dev/null || true; "$WSTEST_DIR/echo.sh" stop "$ECHO_PORT" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$INGRESS_PORT/status.ok" >/dev/null 2>&1 && break
    sleep 0.1
done

"$WSTEST_DIR/compare.sh" "${strict[@]}" --cases "$cases" \
    "ws://127.0.0.1:$ECHO_PORT" "ws://127.0.0.1:$INGRESS_PORT/echo/$ECHO_PORT/" "$outdir"
