"""
What every stage shares, without torch (so prepare.py and embed.py start in a fraction of a second):
errors for bad input, atomic output, the loaders of the files that prepare.py writes (every loader
checks shapes, dtypes, the item count N and the user count U, and names the file when something
is wrong), and the group means and table of per-sample metrics. The torch side is model.py (metrics,
encoder, checkpoints) and embeddings.py (the item embeddings).

Files of a prepared dataset folder DATA (item index 0 is padding, real items are 1..N):
    items.jsonl   N lines {"item_id": str, "text": str}; line i describes item i+1
    train.npz     seq int64 (n, L) left-padded, oldest first; target int64 (n,); user int64 (n,)
    valid.npz     same keys
    test.npz      same keys
    meta.json     source, split, seed, max_len, counts, item_popularity (N+1), user_history_len (U),
                  and with prepare.py --cold_items: cold_frac, cold_items (the held-out item indices)
"""

import argparse
import contextlib
import json
import os
import sys

import numpy as np

SPLITS = ("train", "valid", "test")


class DataError(Exception):
    """Bad input. The message names the file and the problem; main() prints it as one line."""


def interrupted(hint="rerun the same command to continue"):
    """Ctrl-C: one line instead of a traceback, and the shell's exit status for SIGINT (130)."""
    print(f"interrupted; {hint}", file=sys.stderr, flush=True)
    sys.exit(130)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and ends each flag's help with its default, unless
    the help already names it or there is none to show (None, or off for a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


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


@contextlib.contextmanager
def atomic_outputs(*paths):
    """Temporary names beside several outputs (yielded in the same order): all are renamed onto
    `paths` only if the block succeeds, and if one rename fails the outputs already renamed are
    removed again, so a failed run leaves none of them rather than some. An OSError of the block
    or of a rename becomes a DataError naming the output (not its temporary name)."""
    if len({os.path.abspath(p) for p in paths}) < len(paths):
        raise DataError(f"{paths[-1]}: named for two outputs")
    tmps = [f"{path}.tmp{os.getpid()}" for path in paths]
    renamed = []
    try:
        yield tmps
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException as e:
        for path in renamed:
            os.remove(path)
        if isinstance(e, OSError):
            failed = paths[tmps.index(e.filename)] if e.filename in tmps else paths[0]
            raise DataError(f"{failed}: cannot write ({e.strerror or e})") from None
        raise
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def check_output(path):
    """Check before any work that `path` can be written: a file name (not a folder) in a folder
    that exists and that we may write to (os.access: root may write even where the mode says no)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a file name")
    if not os.path.isdir(folder):
        raise DataError(f"{path}: its folder does not exist")
    if not os.access(folder, os.W_OK):
        raise DataError(f"{path}: its folder {folder} is not writable")


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
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            try:
                item = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
                raise DataError(f"{path}:{lineno}: expected an object with a non-empty 'text'")
            items.append(item)
    if not items:
        raise DataError(f"{path}: no items")
    return items


def read_json(path, missing="file not found"):
    """The JSON document in `path`; DataError '{path}: {missing}' when there is no such file, and
    one naming the file for anything else unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    meta = read_json(path, "file not found (run prepare.py first)")
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got a {type(meta).__name__}")
    for key in ("num_items", "max_len", "item_popularity", "user_history_len"):
        if key not in meta:
            raise DataError(f"{path}: missing key '{key}'")
    for key in ("num_items", "max_len"):
        if type(meta[key]) is not int or meta[key] < 1:
            raise DataError(f"{path}: '{key}' is {meta[key]!r}, expected a positive integer")
    # the evaluation groups and --weighting popularity index and weigh with these lists
    check_counts(path, meta, "item_popularity", "iuf")
    check_counts(path, meta, "user_history_len", "iu")
    if len(meta["item_popularity"]) != meta["num_items"] + 1:
        raise DataError(f"{path}: item_popularity has {len(meta['item_popularity'])} entries, "
                        f"expected num_items + 1 = {meta['num_items'] + 1}")
    if meta.get("num_users", len(meta["user_history_len"])) != len(meta["user_history_len"]):
        raise DataError(f"{path}: user_history_len has {len(meta['user_history_len'])} entries, "
                        f"but num_users is {meta['num_users']!r}")
    cold = meta.get("cold_items", [])  # prepare.py --cold_items: item indices held out of training
    if (not isinstance(cold, list) or any(type(i) is not int or not 1 <= i <= meta["num_items"] for i in cold)
            or len(set(cold)) < len(cold)):
        raise DataError(f"{path}: 'cold_items' must be a list of distinct item indices in 1..{meta['num_items']}")
    return meta


def check_counts(path, meta, key, kinds):
    """meta[key] must be a non-empty flat list of finite numbers >= 0 (numpy dtype kinds `kinds`:
    'i', 'u' integers, 'f' floats): strings, nested lists, NaN and inf are refused."""
    try:
        values = np.asarray(meta[key])
    except ValueError:  # ragged nesting
        values = None
    if (values is None or values.ndim != 1 or not len(values) or values.dtype.kind not in kinds
            or not np.isfinite(values).all() or (values < 0).any()):
        what = "integers" if kinds == "iu" else "numbers"
        raise DataError(f"{path}: '{key}' must be a non-empty list of finite {what} >= 0")


def load_split(data_dir, split, num_items, max_len=None, num_users=None, allow_empty=False):
    """DATA/{split}.npz -> dict of int64 arrays seq (n, L), target (n,), user (n,), checked
    against the item count N (indices 0..N in seq, 1..N in target), the history length L and the
    user count U (indices 0..U-1: the evaluation groups index meta.json's user_history_len with
    them, where a negative one would silently wrap). n = 0 is an error unless allow_empty."""
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
    n = target.shape[0] if target.ndim == 1 else -1
    if seq.ndim != 2 or seq.shape[0] != n or user.shape != (n,):
        raise DataError(f"{path}: shapes seq {seq.shape}, target {target.shape}, user {user.shape}; "
                        f"expected (n, L), (n,), (n,)")
    if max_len is not None and seq.shape[1] != max_len:
        raise DataError(f"{path}: seq has length {seq.shape[1]}, meta.json says max_len {max_len}")
    if n == 0:
        if allow_empty:
            return {"seq": seq, "target": target, "user": user}
        raise DataError(f"{path}: no samples (the {split} split is empty)")
    if seq.min() < 0 or seq.max() > num_items or target.min() < 1 or target.max() > num_items:
        raise DataError(f"{path}: item indices outside 1..{num_items} (N from meta.json)")
    if num_users is not None and (user.min() < 0 or user.max() >= num_users):
        raise DataError(f"{path}: user indices {user.min()}..{user.max()} outside 0..{num_users - 1} "
                        f"(U = {num_users} users in meta.json)")
    return {"seq": seq, "target": target, "user": user}


def load_dataset(data_dir, allow_empty=True):
    """meta.json plus the three splits, checked against each other (U = len(user_history_len),
    which load_meta checks against num_users). prepare.py leaves a split empty on a dataset of a
    few users, so that is allowed here by default; a caller that trains or ranks on every split
    passes allow_empty=False."""
    meta = load_meta(data_dir)
    U = len(meta["user_history_len"])
    splits = {s: load_split(data_dir, s, meta["num_items"], meta["max_len"], U, allow_empty) for s in SPLITS}
    return meta, splits


# -----------------------------------------------------------------------------
# summaries of per-sample metrics

def group_means(per_sample, target, user, meta, head_frac=0.2):
    """Mean of each metric over all samples and over head/tail items (the `head_frac` most popular
    in training) and head/tail users (the `head_frac` with the longest training histories); when
    meta.json lists cold items (prepare.py --cold_items), also over the samples whose target is one."""
    pop = np.asarray(meta["item_popularity"])
    head_item = np.zeros(len(pop), dtype=bool)
    head_item[1 + np.argsort(-pop[1:], kind="stable")[:int(np.ceil(head_frac * (len(pop) - 1)))]] = True
    hist = np.asarray(meta["user_history_len"])
    head_user = np.zeros(len(hist), dtype=bool)
    head_user[np.argsort(-hist, kind="stable")[:int(np.ceil(head_frac * len(hist)))]] = True
    hi, hu = head_item[target], head_user[user]
    groups = {"all": np.ones(len(target), dtype=bool), "head_item": hi, "tail_item": ~hi,
              "head_user": hu, "tail_user": ~hu}
    if meta.get("cold_items"):  # only then: the groups of every other dataset stay as they were
        cold = np.zeros(len(pop), dtype=bool)
        cold[meta["cold_items"]] = True
        groups["cold_item"] = cold[target]
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


