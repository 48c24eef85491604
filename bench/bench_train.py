"""
Benchmark of the training stages: SASRec and DreamRec, both with AlphaFuse item embeddings, on one
dataset. Seconds per training epoch and samples/s come from the trainers' own log.jsonl (their
main() runs unchanged, in this process); the test split's full ranking (for DreamRec: DDIM sampling
of every test sample, then ranking) is timed around evaluate.py's main() and around its evaluate()
alone (the ranking without loading the checkpoint and data).

    python bench/bench_train.py                                  # amazon-toys, random 384-d lang_emb, 1 epoch
    python bench/bench_train.py --data data/toys --epochs 3      # a prepared DATA with lang_emb.npy

Without --data it prepares --source (default ../shared/data/amazon-toys, `--split user --seed 0`)
into a temporary folder, writes a random lang_emb.npy (N, --d_l) of unit rows (the shape
all-MiniLM-L6-v2 gives: times depend on shapes, not values) and decomposes it twice: subspace.pt
with d = 128 (or d_l if smaller), d_n = d/2 (decompose.py's defaults) and subspace_dreamrec.pt with
d = d_l, d_n = d_l/2 (a random matrix has no eigenvalue under the official tau = 0.25).
With --data DATA it uses DATA/subspace.pt and DATA/subspace_dreamrec.pt, and makes a missing one in
the temporary folder from DATA/lang_emb.npy (defaults; --null_thres 0.25 for DreamRec).
The trainers run with their defaults (SASRec: InfoNCE with 64 negatives; DreamRec: T = 2000,
20 DDIM steps, w = 5; batch 256 both) plus --sasrec_args / --dreamrec_args, validating only after
the last epoch. Their output goes to RUN/output.txt in the temporary folder (--keep keeps it).
Prints the dataset's sizes, the device, then one table row per backbone: d, seconds per epoch and
training samples/s (mean over the epochs), evaluate.py's wall seconds on the test split, the
seconds of its ranking alone and the test samples/s that makes; on CUDA also the peak GPU memory.
"""

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
from model import load_checkpoint  # noqa: E402
import decompose  # noqa: E402
import evaluate  # noqa: E402
import prepare  # noqa: E402
import train_diffusion  # noqa: E402
import train_discriminative  # noqa: E402


def call(main, argv, log_path):
    """main(argv) with its stdout appended to log_path; a failure (SystemExit) stops the benchmark
    with the stage's own one-line message."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        try:
            main(argv)
        except SystemExit as e:
            if e.code not in (None, 0):
                message = str(e.code).removeprefix("error: ")
                sys.exit(f"error: {main.__module__}.py {' '.join(argv)}: {message} (--keep keeps its output)")


def make_data(args, tmp):
    """The DATA folder and the two subspace files, prepared in tmp where needed (module docstring)."""
    log = os.path.join(tmp, "prepare.txt")
    if args.data:
        data = args.data
    else:
        data = os.path.join(tmp, "data")
        call(prepare.main, [args.source, "--out", data, "--split", "user", "--seed", "0"], log)
        n = common.load_meta(data)["num_items"]
        emb = np.random.default_rng(0).standard_normal((n, args.d_l), dtype=np.float32)
        np.save(os.path.join(data, "lang_emb.npy"), emb / np.linalg.norm(emb, axis=1, keepdims=True))
    subspaces = {}
    for name, flags in (("subspace.pt", []), ("subspace_dreamrec.pt", ["--null_thres", "0.25"])):
        path = os.path.join(data, name)
        if not os.path.exists(path):
            if not args.data:  # random embeddings: fixed block sizes (d = 128 or d_l, d_n = d / 2)
                d = min(128, args.d_l) if name == "subspace.pt" else args.d_l
                flags = ["--dim", str(d), "--null_dim", str(d // 2)]
            path = os.path.join(tmp, name)
            call(decompose.main, [data, "--out", path, *flags], log)
        subspaces[name] = path
    return data, subspaces


def timed(fn, device):
    """(result, wall seconds) of fn(), the GPU's queue drained on both ends."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def bench_backbone(name, trainer, data, subspace, extra, args, tmp):
    """Train --epochs epochs through trainer.main, then time evaluate.py on the test split."""
    run = os.path.join(tmp, name)
    log = os.path.join(run, "output.txt")
    os.makedirs(run)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    call(trainer.main, [data, "--out", run, "--subspace", subspace, "--epochs", str(args.epochs),
                        "--eval_every", str(args.epochs), "--device", args.device, *extra], log)
    with open(os.path.join(run, "log.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    ckpt_path = os.path.join(run, "ckpt.pt")
    _, eval_wall = timed(lambda: call(evaluate.main, [ckpt_path, "--out", os.path.join(run, "bench_metrics.json"),
                                                      "--device", args.device], log), args.device)
    # the ranking alone: the model and the data already loaded, as a trainer's validation has them
    ckpt = load_checkpoint(ckpt_path, args.device)
    model = evaluate.load_model(ckpt, args.device)
    meta = common.load_meta(data)
    results, rank_s = timed(lambda: evaluate.evaluate(model.scorer(0), data, meta, "test", (10, 20), args.device), args.device)
    with open(os.path.join(run, "metrics.json")) as f:
        if json.load(f)["test"] != results:  # the trainer's own test evaluation: a difference is a bug
            print(f"WARNING: {name}: evaluate() disagrees with the trainer's metrics.json", file=sys.stderr)
    n_test = len(common.load_split(data, "test", meta["num_items"])["target"])
    return {"model": name, "d": ckpt["model_args"]["d"],
            "s/epoch": sum(e["seconds"] for e in epochs) / len(epochs),
            "train samples/s": sum(e["samples_per_s"] for e in epochs) / len(epochs),
            "eval wall s": eval_wall, "rank s": rank_s, "test samples/s": n_test / rank_s,
            "NDCG@20": results["all"]["NDCG@20"],
            "peak GB": torch.cuda.max_memory_allocated(args.device) / 1e9 if args.device.startswith("cuda") else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="prepared DATA with lang_emb.npy (and subspace.pt, subspace_dreamrec.pt); default: prepare --source")
    p.add_argument("--source", default=os.path.join(REPO, "..", "shared", "data", "amazon-toys"), help="raw dataset prepared when --data is not given")
    p.add_argument("--d_l", type=int, default=384, help="d_l of the random lang_emb.npy made when --data is not given")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of each backbone")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sasrec_args", default="", help="extra flags for train_discriminative.py, one quoted string")
    p.add_argument("--dreamrec_args", default="", help="extra flags for train_diffusion.py, one quoted string")
    p.add_argument("--tmp", default=None, help="parent of the temporary folder (default: the system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (runs, their output)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench_train_", dir=args.tmp)
    try:
        data, subspaces = make_data(args, tmp)
        meta = common.load_meta(data)
        sizes = {s: len(common.load_split(data, s, meta["num_items"])["target"]) for s in common.SPLITS}
        device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"cpu, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
        print(f"{data}: N = {meta['num_items']:,} items, L = {meta['max_len']}, samples train {sizes['train']:,} / "
              f"valid {sizes['valid']:,} / test {sizes['test']:,}; device {device_name}; {args.epochs} epoch(s)")
        rows = [bench_backbone("sasrec_alphafuse", train_discriminative, data, subspaces["subspace.pt"],
                               shlex.split(args.sasrec_args), args, tmp),
                bench_backbone("dreamrec_alphafuse", train_diffusion, data, subspaces["subspace_dreamrec.pt"],
                               shlex.split(args.dreamrec_args), args, tmp)]
        formats = {"model": "s", "d": "d", "s/epoch": ".2f", "train samples/s": ",.0f", "eval wall s": ".3f",
                   "rank s": ".3f", "test samples/s": ",.0f", "NDCG@20": ".4f", "peak GB": ".2f"}
        print(" | ".join(formats))
        for r in rows:
            print(" | ".join("-" if r[c] is None else format(r[c], f) for c, f in formats.items()))
        print(f"(s/epoch and train samples/s: the trainers' log.jsonl; eval wall s: evaluate.py main() on test; "
              f"rank s: its evaluate() alone; load average after: {os.getloadavg()[0]:.1f})")
        if args.keep:
            print(f"kept {tmp}")
    except common.DataError as e:
        sys.exit(f"error: {e}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
