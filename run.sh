#!/usr/bin/env bash
# The whole pipeline on MovieLens-100K, from nothing to a comparison table:
#   bash run.sh
# creates .venv and installs the requirements, prepares ml-100k (GroupLens download, else the copy
# in the RecBole wheel), embeds the item texts with the local embedding server (embed_local.sh, which
# stops it also on failure or Ctrl-C), decomposes, trains SASRec with AlphaFuse and with ID embeddings and
# DreamRec with AlphaFuse, evaluates the popularity recommender, and prints the test metrics.
# A rerun skips every stage whose output exists and continues an interrupted training (Ctrl-C
# prints one line and exits 130; delete data/ml100k or runs/ml100k to redo).
# Short schedules keep it near 4 minutes on 2 CPU cores: figures for a quick look, not the paper's.
set -euo pipefail
cd "$(dirname "$0")"
DATA=data/ml100k
RUNS=runs/ml100k
PY=.venv/bin/python
THREADS=${THREADS:-$(nproc)}  # torch threads of each training run

timed() {  # NAME COMMAND...: run it, then say how long it took, so a slow machine shows where
    local t0=$SECONDS
    "${@:2}"
    echo "[run.sh] $1: $((SECONDS - t0)) s (load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown))"
}

if [ ! -f .venv/.installed ]; then
    echo "[run.sh] installing requirements-server.txt into .venv (torch, sentence-transformers): a few minutes"
    python3 -m venv .venv
    timed install $PY -m pip install --progress-bar off -r requirements-server.txt
    touch .venv/.installed
fi

[ -f $DATA/meta.json ] || timed prepare $PY prepare.py ml-100k --out $DATA

[ -f $DATA/lang_emb.npy ] || PY=$PY timed embed bash embed_local.sh $DATA

[ -f $DATA/subspace.pt ] || timed decompose $PY decompose.py $DATA
[ -f $DATA/subspace_dreamrec.pt ] || timed decompose $PY decompose.py $DATA --null_thres 0.25 --out $DATA/subspace_dreamrec.pt

# --resume continues a run that Ctrl-C (or anything else) interrupted, and starts one that has no last.pt
for emb in alphafuse id; do
    [ -f $RUNS/sasrec_$emb/metrics.json ] || timed "SASRec $emb" \
        $PY train_discriminative.py $DATA --out $RUNS/sasrec_$emb --item_emb $emb --epochs 10 --patience 3 --threads $THREADS --resume
done
[ -f $RUNS/dreamrec_alphafuse/metrics.json ] || timed "DreamRec alphafuse" \
    $PY train_diffusion.py $DATA --out $RUNS/dreamrec_alphafuse --epochs 3 --lr 1e-3 --threads $THREADS --resume
[ -f $RUNS/popularity/metrics.json ] || \
    { mkdir -p $RUNS/popularity && $PY evaluate.py --popularity --data $DATA --out $RUNS/popularity/metrics.json; }

echo
echo "ml-100k, test split, full ranking over all items:"
$PY - $RUNS <<'EOF'
import json, sys
print(f"{'method':20s} {'HR@10':>8s} {'HR@20':>8s} {'NDCG@10':>8s} {'NDCG@20':>8s}")
for name in ("popularity", "sasrec_id", "sasrec_alphafuse", "dreamrec_alphafuse"):
    m = json.load(open(f"{sys.argv[1]}/{name}/metrics.json"))["test"]["all"]
    print(f"{name:20s} " + " ".join(f"{m[k]:8.4f}" for k in ("HR@10", "HR@20", "NDCG@10", "NDCG@20")))
EOF
