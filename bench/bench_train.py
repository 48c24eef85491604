"""
Benchmark of training and evaluation: our SASRec step and full ranking against the same model
written the obvious way (bench/reference.py: every position through every block, the (B, 1+K, d)
candidates gathered and normalised, plain Adam, the full (B, N+1) score matrix counted in int64),
on the same weights and batches, at 1 and 2 threads; DreamRec's step and DDIM evaluation; and one
ml-1m leave-one-out epoch in each training regime.

    python bench/bench_train.py                       # amazon-toys and ml-1m from ../shared/data
    python bench/bench_train.py --toys data/toys --ml1m data/ml1m --steps 100

--toys / --ml1m: prepared DATA folders with lang_emb.npy; without them the raw datasets in
../shared/data are prepared into a temporary folder (amazon-toys --split user --seed 0, ml-1m
--split loo) with random unit-row 384-d language embeddings (times depend on shapes, not values).
The SASRec model is trained one epoch first (ours), so that evaluation ranks a model that has
learned something: the pruned full ranking is faster for a random one. Samples/s are wall-clock
rates over --steps batches of 256 (after 3 warm-up steps), the two sides alternating at each thread
count; evaluation is the valid split. ml-1m: the whole-sequence epoch is timed in full, the windows
epoch is extrapolated from --steps batches (it has 981,491 samples). Prints one line per figure.
"""

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
import decompose  # noqa: E402
import prepare  # noqa: E402
import reference  # noqa: E402
import train_diffusion  # noqa: E402
import train_discriminative  # noqa: E402
import training  # noqa: E402
from embeddings import load_subspace  # noqa: E402
from model import full_ranking  # noqa: E402


def make_data(source, out, split, tmp):
    """A prepared DATA with lang_emb.npy and the subspaces, made in tmp from `source` unless `out` is given."""
    quiet = contextlib.redirect_stdout(open(os.devnull, "w"))  # the stages' own reports are not figures
    if not out:
        out = os.path.join(tmp, os.path.basename(source))
        with quiet:
            prepare.main([source, "--out", out, "--split", split])
        n = common.load_meta(out)["num_items"]
        emb = np.random.default_rng(0).standard_normal((n, 384), dtype=np.float32)
        np.save(os.path.join(out, "lang_emb.npy"), emb / np.linalg.norm(emb, axis=1, keepdims=True))
    d_l = np.load(os.path.join(out, "lang_emb.npy"), mmap_mode="r").shape[1]
    for name, flags in (("subspace.pt", []), ("subspace_dreamrec.pt", ["--dim", str(d_l), "--null_dim", str(d_l // 2)])):
        if not os.path.exists(os.path.join(out, name)):  # DreamRec: d = d_l; the block sizes do not change the time
            with quiet:
                decompose.main([out, "--out", os.path.join(tmp, name), *flags])
    path = lambda name: os.path.join(out, name) if os.path.exists(os.path.join(out, name)) else os.path.join(tmp, name)
    return out, path("subspace.pt"), path("subspace_dreamrec.pt")


def sasrec(data, subspace, meta):
    sub = load_subspace(subspace, meta["num_items"])
    return train_discriminative.build_model(dict(
        item_emb="alphafuse", num_items=meta["num_items"], d=sub["lang_emb"].shape[1], max_len=meta["max_len"],
        num_blocks=1, num_heads=1, dropout=0.1, score="cosine", eval_score="cosine", temperature=0.07,
        d_s=sub["d_s"]), sub["lang_emb"])


def rate(step, batches):
    """Samples/s of step(batch) over the batches, wall clock, after 3 warm-up steps."""
    for b in batches[:3]:
        step(b)
    t0 = time.perf_counter()
    for b in batches[3:]:
        step(b)
    return sum(len(b[0]) for b in batches[3:]) / (time.perf_counter() - t0)


def sasrec_step(model, fast):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fast)

    def step(batch):
        seq, target, neg = batch
        loss = model.loss(seq, target, "infonce", 0, None, neg=neg) if fast else reference.loss(model, seq, target, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def batches(split, n, num_items, g, K=64, B=256):
    idx = torch.randperm(len(split["target"]), generator=g)[:n * B].split(B)
    return [(split["seq"][i], split["target"][i], torch.randint(1, num_items + 1, (len(i), K), generator=g)) for i in idx]


def eval_rate(fn, split, rows=None):
    seq, target = split["seq"][:rows], split["target"][:rows]
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(seq, target)
    return len(target) / (time.perf_counter() - t0)


def bench_toys(data, subspace, subspace_dreamrec, args):
    meta, splits = common.load_dataset(data)
    train, valid = ({k: torch.from_numpy(v) for k, v in splits[s].items()} for s in ("train", "valid"))
    g = torch.Generator().manual_seed(0)
    model = sasrec(data, subspace, meta)
    step = sasrec_step(model, fast=True)
    torch.set_num_threads(max(args.threads))
    for b in batches(train, -(-len(train["target"]) // 256), meta["num_items"], g):  # one epoch: a model that ranks
        step(b)
    model.eval()
    print(f"amazon-toys: N = {meta['num_items']:,}, L = {meta['max_len']}, {len(train['target']):,} training windows, "
          f"{len(valid['target']):,} valid; SASRec trained 1 epoch (valid NDCG@20 "
          f"{full_ranking(model.scorer(), valid['seq'], valid['target'])['NDCG@20'].mean():.4f})")
    for threads in args.threads:
        torch.set_num_threads(threads)
        model.train()
        bs = batches(train, args.steps + 3, meta["num_items"], g)
        slow, fast = rate(sasrec_step(model, False), bs), rate(sasrec_step(model, True), bs)
        print(f"  SASRec train, {threads} thread(s): obvious {slow:,.0f} samples/s, ours {fast:,.0f} ({fast / slow:.1f}x)")
        model.eval()
        slow = eval_rate(lambda s, t: reference.metrics(model, s, t), valid)
        fast = eval_rate(lambda s, t: full_ranking(model.scorer(), s, t), valid)
        print(f"  SASRec full ranking, {threads} thread(s): obvious {slow:,.0f} samples/s, ours {fast:,.0f} ({fast / slow:.1f}x)")
        sub = load_subspace(subspace_dreamrec)
        dream = train_diffusion.build_model(dict(
            item_emb="alphafuse", num_items=meta["num_items"], d=sub["lang_emb"].shape[1], max_len=meta["max_len"],
            num_blocks=1, num_heads=1, dropout=0.1, timesteps=2000, beta_start=1e-4, beta_end=0.02, schedule="linear",
            w=5.0, p_uncond=0.1, sample_steps=20, d_s=sub["d_s"]), sub["lang_emb"])
        opt = torch.optim.AdamW(dream.parameters(), lr=1e-5, fused=True)

        def dream_step(batch):
            loss = dream.loss(batch[0], batch[1], g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_rate = rate(dream_step, bs)
        dream.eval()
        ddim_rate = eval_rate(lambda s, t: full_ranking(dream.scorer(), s, t), valid, rows=4096)
        print(f"  DreamRec, {threads} thread(s): train {train_rate:,.0f} samples/s, DDIM ({dream.sample_steps} steps, "
              f"w = {dream.w}) + ranking {ddim_rate:,.0f} samples/s")


def bench_ml1m(data, subspace, args):
    meta, splits = common.load_dataset(data)
    train = {k: torch.from_numpy(v) for k, v in splits["train"].items()}
    sequences = training.whole_sequences(train)
    g = torch.Generator().manual_seed(0)
    torch.set_num_threads(max(args.threads))
    model = sasrec(data, subspace, meta).train()
    step = sasrec_step(model, fast=True)
    windows = batches(train, args.steps + 3, meta["num_items"], g)
    window_rate = rate(step, windows)
    seq_batches = []
    for i in torch.randperm(len(sequences["target"]), generator=g).split(256):
        seq, target = sequences["seq"][i], sequences["target"][i]
        seq_batches.append((seq, target, torch.randint(1, meta["num_items"] + 1, (int((target > 0).sum()), 64), generator=g)))
    t0 = time.perf_counter()
    for b in seq_batches:
        step(b)
    seq_seconds = time.perf_counter() - t0
    n = len(train["target"])
    print(f"ml-1m leave-one-out, {max(args.threads)} thread(s): windows {n:,} samples, {window_rate:,.0f}/s, an epoch "
          f"~{n / window_rate:.0f} s (extrapolated from {args.steps} steps); whole sequences {len(sequences['target']):,} "
          f"users, an epoch {seq_seconds:.1f} s ({n / window_rate / seq_seconds:.0f}x less time)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    shared = os.path.join(REPO, "..", "shared", "data")
    p.add_argument("--toys", default=None, help="prepared amazon-toys DATA with lang_emb.npy (default: prepared from ../shared/data)")
    p.add_argument("--ml1m", default=None, help="prepared ml-1m --split loo DATA with lang_emb.npy (default: prepared from ../shared/data)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps of 256 samples per figure")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to measure")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    training.keep_freed_memory()
    try:
        print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
        bench_toys(*make_data(os.path.join(shared, "amazon-toys"), args.toys, "user", tmp), args)
        data, subspace, _ = make_data(os.path.join(shared, "ml-1m"), args.ml1m, "loo", tmp)
        bench_ml1m(data, subspace, args)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    except common.DataError as e:
        sys.exit(f"error: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
