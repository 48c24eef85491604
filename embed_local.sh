#!/usr/bin/env bash
# Embeds the item texts of each prepared DATA folder with the local all-MiniLM-L6-v2 server:
#   bash embed_local.sh data/ml100k [data/ml-1m ...]
# starts serve_embeddings.py on a free port, runs embed.py on every DATA (-> DATA/lang_emb.npy),
# and stops the server when done, on failure or on Ctrl-C. PY picks the interpreter (default
# .venv/bin/python when it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
log=$(mktemp)
$PY serve_embeddings.py --port 0 > "$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 120); do  # the model takes a few seconds to load
    grep -q "listening on" "$log" && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
done
url=$(grep -o "http://[^ ]*" "$log" | head -n 1)
for data in "$@"; do
    $PY embed.py "$data" --base_url "$url"
done
