#!/usr/bin/env bash
# Embeds the item texts of each prepared DATA folder with the local all-MiniLM-L6-v2 server:
#   bash embed_local.sh data/ml100k [data/ml-1m ...]
# starts serve_embeddings.py on a free port, waits until its /health answers (at most WAIT seconds,
# default 300), runs embed.py on every DATA (-> DATA/lang_emb.npy), and stops the server when done,
# on failure or on Ctrl-C. PY picks the interpreter (default: the repository's .venv/bin/python when
# it exists, else python3). DATA paths are relative to where it is run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
log=$(mktemp)
$PY "$here/serve_embeddings.py" --port 0 > "$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
fail() { echo "error: $1; its output:" >&2; cat "$log" >&2; exit 1; }
# The port is bound and printed before the model loads; a request sent meanwhile waits until the
# model is ready, and fails at once if the server dies: so /health answering means ready.
deadline=$((SECONDS + ${WAIT:-300})) url=
until [ -n "$url" ] && $PY -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=30)' \
        "${url%/v1}/health" 2>/dev/null; do
    kill -0 $server 2>/dev/null || fail "serve_embeddings.py stopped before it was ready"
    [ $SECONDS -lt $deadline ] || fail "serve_embeddings.py not ready after ${WAIT:-300} s"
    sleep 0.2
    url=$(grep -o -m 1 "http://[^ ]*/v1" "$log" || true)
done
for data in "$@"; do
    $PY "$here/embed.py" "$data" --base_url "$url"
done
