"""
What every stage shares, without torch (so prepare.py and embed.py start in a fraction of a second):
errors for bad input, atomic output, the loaders of the files that prepare.py writes (every loader
checks shapes, dtypes and the item count N, and names the file when something is wrong), and the
group means and table of per-sample metrics. The torch side (metrics, models, checkpoints) is model.py.

Files of a prepared dataset folder DATA (item index 0 is padding, real items are 1..N):
    items.jsonl   N lines {"item_id": str, "text": str}; line i describes item i+1
    train.npz     seq int64 (n, L) left-padded, oldest first; target int64 (n,); user int64 (n,)
    valid.npz     same keys
    test.npz      same keys
    meta.json     source, split, seed, max_len, counts, item_popularity (N+1), user_history_len (U)
"""

import contextlib
import json
import os

import numpy as np

SPLITS = ("train", "valid", "test")


class DataError(Exception):
    """Bad input. The message names the file and the problem; main() prints it as one line."""


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file beside `path`; rename it onto `path` only if the block succeeds,
    so a crash or a bad input never leaves a partial output behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# -----------------------------------------------------------------------------
# loaders of the prepared dataset files

def read_items(data_dir):
    """items.jsonl -> list of N dicts with 'item_id' and 'text' (item i+1 is entry i)."""
    path = os.path.join(data_dir, "items.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (run prepare.py first)")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
                raise DataError(f"{path}:{lineno}: expected an object with a non-empty 'text'")
            items.append(item)
    if not items:
        raise DataError(f"{path}: no items")
    return items


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (run prepare.py first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for key in ("num_items", "max_len", "item_popularity", "user_history_len"):
        if key not in meta:
            raise DataError(f"{path}: missing key '{key}'")
    if len(meta["item_popularity"]) != meta["num_items"] + 1:
        raise DataError(f"{path}: item_popularity has {len(meta['item_popularity'])} entries, "
                        f"expected num_items + 1 = {meta['num_items'] + 1}")
    return meta


def load_split(data_dir, split, num_items, max_len=None):
    """DATA/{split}.npz -> dict of int64 arrays seq (n, L), target (n,), user (n,), checked
    against the item count N (indices 0..N in seq, 1..N in target) and the history length L."""
    path = os.path.join(data_dir, f"{split}.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (run prepare.py first)") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    for key in ("seq", "target", "user"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}'")
        if arrays[key].dtype != np.int64:
            raise DataError(f"{path}: '{key}' has dtype {arrays[key].dtype}, expected int64")
    seq, target, user = arrays["seq"], arrays["target"], arrays["user"]
    n = len(target)
    if seq.ndim != 2 or seq.shape[0] != n or target.ndim != 1 or user.shape != (n,):
        raise DataError(f"{path}: shapes seq {seq.shape}, target {target.shape}, user {user.shape}; "
                        f"expected (n, L), (n,), (n,)")
    if max_len is not None and seq.shape[1] != max_len:
        raise DataError(f"{path}: seq has length {seq.shape[1]}, meta.json says max_len {max_len}")
    if n and (seq.min() < 0 or seq.max() > num_items or target.min() < 1 or target.max() > num_items):
        raise DataError(f"{path}: item indices outside 1..{num_items} (N from meta.json)")
    return {"seq": seq, "target": target, "user": user}


def load_dataset(data_dir):
    """meta.json plus the three splits, checked against each other."""
    meta = load_meta(data_dir)
    splits = {s: load_split(data_dir, s, meta["num_items"], meta["max_len"]) for s in SPLITS}
    return meta, splits


# -----------------------------------------------------------------------------
# summaries of per-sample metrics

def group_means(per_sample, target, user, meta, head_frac=0.2):
    """Mean of each metric over all samples and over head/tail items (the `head_frac` most popular
    in training) and head/tail users (the `head_frac` with the longest training histories)."""
    pop = np.asarray(meta["item_popularity"])
    head_item = np.zeros(len(pop), dtype=bool)
    head_item[1 + np.argsort(-pop[1:], kind="stable")[:int(np.ceil(head_frac * (len(pop) - 1)))]] = True
    hist = np.asarray(meta["user_history_len"])
    head_user = np.zeros(len(hist), dtype=bool)
    head_user[np.argsort(-hist, kind="stable")[:int(np.ceil(head_frac * len(hist)))]] = True
    hi, hu = head_item[target], head_user[user]
    groups = {"all": np.ones(len(target), dtype=bool), "head_item": hi, "tail_item": ~hi,
              "head_user": hu, "tail_user": ~hu}
    return {g: {k: (float(v.numpy()[mask].mean()) if mask.any() else None) for k, v in per_sample.items()}
            for g, mask in groups.items()}


def format_table(results):
    """{split: {group: {metric: value}}} -> a text table, one row per split and group."""
    lines = []
    for split, groups in results.items():
        names = list(groups["all"])
        lines.append(f"{'split':6s} {'group':10s} " + " ".join(f"{n:>8s}" for n in names))
        for group, m in groups.items():
            cells = (f"{m[n]:8.4f}" if m[n] is not None else f"{'-':>8s}" for n in names)
            lines.append(f"{split:6s} {group:10s} " + " ".join(cells))
    return "\n".join(lines)


