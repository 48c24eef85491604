"""
Turn raw interactions and item metadata into the files every later stage reads.

    python prepare.py ../shared/data/amazon-toys --out data/toys --split user --seed 0
    python prepare.py ml-1m --out data/ml1m --split loo          # downloads from GroupLens

SOURCE is a folder, a file (standing for its folder), a .zip, or a named dataset (ml-100k, ml-1m).
Formats (recbole, ml-100k, ml-1m, amazon 2014/2018, amazon2023; see formats.py) are detected
from the file names or forced with --format.
Outputs in DIR (item index 0 is padding, items 1..N in ascending original-id order):
    items.jsonl                N lines {"item_id", "text"}
    {train,valid,test}.npz     seq int64 (n, L) left-padded, target int64 (n,), user int64 (n,)
    meta.json                  settings, counts, item_popularity (N+1), user_history_len (U)
Protocol (../shared/DESIGN.md): each user's interactions sorted by time, ties in file order.
--split user: users permuted with default_rng(seed); 80/10/10% of users; every t = 2..n is a
sample of its user's split. --split loo: targets t = 2..n-2 train, n-1 valid, n test; users with
fewer than 3 interactions are dropped (printed) before items are indexed.
--cold_items FRAC (new items, for evaluate.py's cold_item group): floor(FRAC N) items drawn with
default_rng([seed, 1]) are cut out of every history and every training target (what is left of a
user's sequence keeps its order); valid and test samples whose target is cold are kept. The items
stay in items.jsonl (so they get language embeddings), with popularity 0; meta.json lists them.
DIR must lie apart from SOURCE (and from --cache_dir); --overwrite replaces only a folder that
prepare.py wrote (its meta.json says so). Flags and DIR are checked before anything is read.
Prints users, items, interactions, samples per split, text length and seconds.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time

import numpy as np

from common import DataError, HelpFormatter, interrupted, write_json
from formats import READERS, detect_format, fetch_named, list_files, source_root

DATASETS = {
    "ml-100k": {"url": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "md5": "0e33842e24a9c977be4e0107933c0723"},
    "ml-1m": {"url": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
              "md5": "c4d9eecfca2ab87c1945afe126590906"},
}
# -----------------------------------------------------------------------------
# the protocol

def index_ids(ids):
    """Original ids -> (sorted unique ids, index of each); numeric order when all are integers."""
    uniq, inverse = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
    if all(u.isdigit() for u in uniq):
        order = np.array(sorted(range(len(uniq)), key=lambda i: int(uniq[i])), dtype=np.int64)  # any size
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        uniq, inverse = uniq[order], rank[inverse]
    return uniq, inverse


def kcore(user, item, k):
    """Keep interactions whose user and item both have >= k of them, until nothing changes."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        ok = keep & (np.bincount(user[keep], minlength=user.max() + 1)[user] >= k) \
                  & (np.bincount(item[keep], minlength=item.max() + 1)[item] >= k)
        if ok.sum() == keep.sum():
            return keep
        keep = ok


def histories(item_seq, end, start, L):
    """(n, L) left-padded histories: item_seq[max(start, end - L):end] of each sample, newest last."""
    idx = end[:, None] + np.arange(-L, 0)  # (n, L)
    return np.where(idx >= start[:, None], item_seq[np.maximum(idx, 0)], 0)


def choose_cold(N, frac, seed):
    """(N+1,) bool: floor(frac N) items drawn at random, held out of training (--cold_items)."""
    cold = np.zeros(N + 1, dtype=bool)
    if frac:
        if int(frac * N) == 0:
            raise DataError(f"--cold_items {frac}: selects none of the {N} items (floor({frac} * {N}) = 0)")
        # a stream of its own, so the users' split is the same with and without --cold_items
        cold[1 + np.random.default_rng([seed, 1]).choice(N, int(frac * N), replace=False)] = True
    return cold


def build(users, items, times, texts, inter_name, meta_name, args):
    try:
        times = np.asarray(times, dtype=np.float64)
    except ValueError:
        bad = next(t for t in times if not re.fullmatch(r"\s*[-+0-9.eE]+\s*", t))
        raise DataError(f"{inter_name}: non-numeric timestamp '{bad}'") from None
    if not np.isfinite(times).all():
        raise DataError(f"{inter_name}: non-finite timestamp '{times[~np.isfinite(times)][0]}'")
    missing = sorted(set(items) - texts.keys())
    if missing:
        raise DataError(f"{meta_name}: no text row for {len(missing)} items, e.g. '{missing[0]}'")
    _, user = index_ids(users)
    _, item = index_ids(items)
    keep = kcore(user, item, args.kcore) if args.kcore > 0 else np.ones(len(user), dtype=bool)
    if not keep.any():
        raise DataError(f"{inter_name}: no interactions left after --kcore {args.kcore}")
    if args.split == "loo":  # leave-one-out needs a train, a valid and a test interaction
        short = keep & (np.bincount(user[keep], minlength=user.max() + 1)[user] < 3)
        if short.any():
            print(f"loo: dropped {len(np.unique(user[short]))} users with fewer than 3 interactions")
        keep &= ~short
    if not keep.any():
        raise DataError(f"{inter_name}: no user has the 3 interactions that --split loo needs")
    item_ids, item = index_ids(np.asarray(items)[keep])
    item = item + 1  # 0 is padding
    _, user = np.unique(user[keep], return_inverse=True)
    times = times[keep]
    order = np.lexsort((times, user))  # lexsort is stable: same-time interactions keep file order
    user, item = user[order], item[order]
    U, N = user.max() + 1, len(item_ids)
    length = np.bincount(user, minlength=U)
    first = np.repeat(np.cumsum(length) - length, length)  # index of each row's first interaction
    pos = np.arange(len(user)) - first  # 0-based position t-1 within its user
    n = length[user]
    # Cold items are cut out of every history: histories index the warm interactions only, wpos[r]
    # being how many come before row r. A sample needs one item of history, as at t = 2 otherwise.
    cold = choose_cold(N, args.cold_items, args.seed)
    warm = ~cold[item]
    wpos = np.cumsum(warm) - warm
    has_history = wpos > wpos[first]
    if args.split == "user":
        perm = np.random.default_rng(args.seed).permutation(U)
        group = np.empty(U, dtype=np.int64)
        n_train, n_valid = int(0.8 * U), int(0.1 * U)
        group[perm[:n_train]], group[perm[n_train:n_train + n_valid]], group[perm[n_train + n_valid:]] = 0, 1, 2
        which = np.where(has_history & (warm | (group[user] > 0)), group[user], -1)  # cold targets: valid, test
        seen = warm  # what training shows of a user (a train user) or what the histories show
        popularity = np.bincount(item[seen & (group[user] == 0)], minlength=N + 1)
    else:
        which = np.select([pos == n - 1, pos == n - 2, warm], [2, 1, 0], -1)
        which[~has_history] = -1
        seen = warm & (pos <= n - 3)
        popularity = np.bincount(item[seen], minlength=N + 1)
    history_len = np.bincount(user[seen], minlength=U)  # without cold items: n (user), n - 2 (loo)
    splits = {}
    for k, name in enumerate(("train", "valid", "test")):
        rows = np.flatnonzero(which == k)
        splits[name] = {"seq": histories(item[warm], wpos[rows], wpos[first[rows]], args.max_len).astype(np.int64),
                        "target": item[rows].astype(np.int64), "user": user[rows].astype(np.int64)}
    meta = {"num_users": int(U), "num_items": int(N), "num_interactions": int(len(user)),
            "num_samples": {s: len(a["target"]) for s, a in splits.items()},
            "item_popularity": popularity.tolist(), "user_history_len": history_len.tolist()}
    if args.cold_items:
        meta.update(cold_frac=args.cold_items, cold_items=np.flatnonzero(cold).tolist())
    return [{"item_id": str(i), "text": texts[i]} for i in item_ids], splits, meta


# -----------------------------------------------------------------------------
# the output folder: checked before anything is read, replaced only once the new one is complete

PREPARED_KEYS = ("source", "format", "split", "num_items", "num_samples")  # what marks our meta.json


def within(path, folder):
    """Whether the real path `path` is `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def written_by_prepare(folder):
    """Whether `folder` holds a meta.json that prepare.py wrote: a JSON object with its keys."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return False
    return isinstance(meta, dict) and all(k in meta for k in PREPARED_KEYS)


def check_writable(folder, what):
    """`folder`, or its nearest existing parent (missing folders are made), must let us create
    entries. os.access answers for this user: root passes a 0o555 folder (it can write there), and
    a read-only file system fails everyone."""
    folder = os.path.realpath(folder)  # absolute, so that the walk up ends at /
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{what}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{what}: cannot write in the folder {folder} (permission denied)")


def check_output(out, overwrite):
    """Refuse an --out that cannot be written, or whose replacement would delete what prepare.py
    did not write. Returns its real path (symlinks and '..' resolved)."""
    real = os.path.realpath(out)
    if os.path.exists(real):
        if not os.path.isdir(real):
            raise DataError(f"--out {out}: exists and is not a folder")
        if not overwrite:
            raise DataError(f"--out {out}: output folder exists (use --overwrite to replace it)")
        if not written_by_prepare(real):
            raise DataError(f"--out {out}: --overwrite only replaces a folder that prepare.py wrote, "
                            f"and this one has no meta.json of prepare.py")
    check_writable(os.path.dirname(real), f"--out {out}")
    return real


def check_apart(out, source, cache_dir):
    """The output must not hold, or lie in, what is read: --overwrite would delete it. A zip is only
    read, so an output beside it is fine; a named dataset's cache must not lie in the output."""
    real_out = os.path.realpath(out)
    if os.path.exists(source):
        root, what = os.path.realpath(source_root(source)), f"the source {source}"
        overlap = within(root, real_out) or (not os.path.isfile(root) and within(real_out, root))
    else:
        root, what = os.path.realpath(cache_dir), f"--cache_dir {cache_dir}"
        overlap = within(root, real_out)
    if overlap:
        relation = "is" if root == real_out else "contains" if within(root, real_out) else "lies inside"
        raise DataError(f"--out {out}: {relation} {what}; write the output elsewhere")


def replace_folder(tmp, real):
    """Rename `tmp` to `real`; an existing `real` is set aside first and deleted only afterwards,
    so a failure at any step leaves either the old folder or the new one, never a mix."""
    if not os.path.exists(real):
        os.rename(tmp, real)
        return
    old = f"{real}.old{os.getpid()}"
    os.rename(real, old)
    try:
        os.rename(tmp, real)
    except OSError:
        os.rename(old, real)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:  # the new output stands; the old one could not be fully deleted
        print(f"note: the replaced folder is left at {old} ({e.strerror})")


def write_output(out, real, items, splits, meta, overwrite):
    """Write everything into a temporary folder beside the output, then rename it into place:
    no partial output folder. Parent folders that this creates are removed again on failure."""
    parents, folder = [], os.path.dirname(real)  # the folders above the output that this run makes
    while not os.path.exists(folder):
        parents.append(folder)
        folder = os.path.dirname(folder)
    name, tmp, done = f"{real}.tmp{os.getpid()}", None, False
    try:
        os.makedirs(os.path.dirname(real), exist_ok=True)
        os.mkdir(name)  # an existing folder of that name is not ours: an error, never deleted
        tmp = name
        with open(os.path.join(tmp, "items.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        for name, arrays in splits.items():
            np.savez(os.path.join(tmp, f"{name}.npz"), **arrays)
        write_json(os.path.join(tmp, "meta.json"), meta)
        check_output(out, overwrite)  # again: the folder may have appeared or changed meanwhile
        replace_folder(tmp, real)
        done = True
    except OSError as e:
        raise DataError(f"--out {out}: cannot write ({e})") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in [] if done else parents:  # innermost first; rmdir only removes empty ones
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def check_flags(args):
    for flag, value in (("SOURCE", args.source), ("--out", args.out), ("--cache_dir", args.cache_dir)):
        if not value:
            raise DataError(f"{flag}: empty path")
    if args.max_len is None:
        args.max_len = 10 if args.split == "user" else 50
    for flag, value, low in (("--max_len", args.max_len, 1), ("--seed", args.seed, 0), ("--kcore", args.kcore, 0)):
        if value < low:
            raise DataError(f"{flag} must be >= {low}, got {value}")
    if not 0 <= args.cold_items < 1:  # NaN fails too
        raise DataError(f"--cold_items must be in [0, 1), got {args.cold_items}")


def run(args):
    check_flags(args)
    local = os.path.exists(args.source)
    if not local and args.source not in DATASETS:
        raise DataError(f"{args.source}: no such file or folder, nor a named dataset ({', '.join(DATASETS)})")
    cache = os.path.expanduser(args.cache_dir)
    if not local:  # the download goes there; a file in its place is refused as not a folder
        check_writable(cache, f"--cache_dir {args.cache_dir}")
    check_apart(args.out, args.source, cache)  # first: it says best why an --out must not be used
    real_out = check_output(args.out, args.overwrite)
    t0 = time.time()
    files = list_files(args.source) if local else fetch_named(args.source, DATASETS[args.source], cache)
    fmt = detect_format(files, args.source) if args.format == "auto" else args.format
    items, splits, stats = build(*READERS[fmt](files), args)
    meta = {"source": args.source, "format": fmt, "split": args.split, "seed": args.seed,
            "max_len": args.max_len, "kcore": args.kcore, **stats}
    write_output(args.out, real_out, items, splits, meta, args.overwrite)
    lengths = np.array([len(i["text"]) for i in items])
    print(f"{fmt}: {stats['num_users']:,} users, {stats['num_items']:,} items, "
          f"{stats['num_interactions']:,} interactions")
    print("samples: " + ", ".join(f"{s} {n:,}" for s, n in stats["num_samples"].items()) +
          f" (split {args.split}, L={args.max_len}, seed {args.seed})")
    if args.cold_items:
        cold = set(stats["cold_items"])
        print(f"cold items: {len(cold):,} of {stats['num_items']:,} held out of training; samples with a cold target: "
              + ", ".join(f"{s} {np.isin(a['target'], list(cold)).sum():,}" for s, a in splits.items()))
    print(f"text length: mean {lengths.mean():.0f} chars, max {lengths.max()}; "
          f"wrote {args.out} in {time.time() - t0:.1f}s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("source", help="folder, file, .zip, or a named dataset (ml-100k, ml-1m)")
    parser.add_argument("--out", required=True, help="output folder DATA, apart from SOURCE")
    parser.add_argument("--split", choices=["user", "loo"], default="user", help="cold-start users (paper Table 2) or leave-one-out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user permutation (--split user) and of --cold_items, >= 0")
    parser.add_argument("--max_len", type=int, default=None, help="history length L (default 10 for user, 50 for loo)")
    parser.add_argument("--kcore", type=int, default=0, help="keep only users and items with >= K interactions (0: off)")
    parser.add_argument("--cold_items", type=float, default=0.0, metavar="FRAC", help="hold out floor(FRAC N) random items: "
                        "none in training or in any history; valid/test samples whose target is one are kept (0: off)")
    parser.add_argument("--format", choices=["auto", *READERS], default="auto", help="input format (default: detect)")
    parser.add_argument("--cache_dir", default="~/.cache/alphafuse", help="where named datasets are downloaded")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder that prepare.py wrote")
    args = parser.parse_args(argv)
    try:
        run(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        interrupted()


if __name__ == "__main__":
    main()
