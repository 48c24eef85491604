"""
Evaluate a checkpoint by full ranking over all N items (or the sampled protocol of LLM-ESR), over
all test samples and per head/tail item and user group; or the popularity recommender.

    python evaluate.py runs/toys_alphafuse/ckpt.pt                      # -> runs/toys_alphafuse/metrics.json
    python evaluate.py runs/toys_alphafuse/ckpt.pt --mask_history       # -> runs/toys_alphafuse/metrics_masked.json
    python evaluate.py --popularity --data data/toys --out runs/toys_popularity.json  # most popular training items

Reads  CKPT (train_discriminative.py or train_diffusion.py) and its DATA/{split}.npz, meta.json.
Writes FILE as {split: {group: {"HR@10": x, "NDCG@10": x, "MRR@10": x, "HR@20": ...}}}, groups
       all, head_item, tail_item (the 20% most popular training items and the rest), head_user,
       tail_user (the 20% of users with the longest training histories and the rest), and
       cold_item (targets among meta.json's cold_items, when prepare.py --cold_items made some).
FILE is --out, which --popularity requires (only prepare.py, embed.py and decompose.py write into
DATA), as does a --data other than the folder CKPT was trained on. Without --out, FILE lies beside
CKPT, named from the options, so that only the trainer's own protocol (--split test, full ranking,
no mask, --ks 10,20, seed 0) rewrites the trainer's metrics.json, with the same numbers; any other
evaluation writes metrics_<parts>.json, with the parts that differ from that protocol in this
order: valid, masked, sampled<M>, k<K,K,...> (--ks as parsed), cosine or dot (--eval_score other
than the checkpoint's own), seed<S> (only where the seed changes the numbers: with --sampled, or
DreamRec's x_T). E.g. --split valid --mask_history --ks 5,10 -> metrics_valid_masked_k5,10.json;
--sampled 100 --seed 1 -> metrics_sampled100_seed1.json.
Prints the same as a table.
rank = 1 + #{j != target : score_j >= score_target} (ties count against the model);
HR@K = [rank <= K], NDCG@K = [rank <= K] / log2(rank + 1), MRR@K = [rank <= K] / rank.
--mask_history removes the items of the sample's history window (except the target) from the
ranking; --sampled M ranks the target against M items drawn (seeded) from outside that window, so
the two together are refused (the mask would change nothing). Cold items (prepare.py --cold_items)
need no option: the trainers never touch them (never a negative; their rows stay as they started,
a zero ID part), so AlphaFuse scores them as recommend.py --new_items scores new items.
Bad flags, a checkpoint that does not fit DATA (N, L, its own weights) or a split with user indices
outside meta.json's users fail before the ranking with one `error:` line; FILE is written last.
"""

import argparse
import os
import sys

import torch

import common
from common import DataError
from model import check_device, full_ranking, load_checkpoint


def check_checkpoint(ckpt, path):
    """A trainer checkpoint: a dict with model (weights), model_args (dict), config (dict)."""
    if (not isinstance(ckpt, dict) or not all(k in ckpt for k in ("model", "model_args", "config"))
            or not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["config"], dict)):
        raise DataError(f"{path}: not a checkpoint of train_discriminative.py or train_diffusion.py")


def load_model(ckpt, device, path="checkpoint"):
    """Rebuild the model from the checkpoint's model_args and load its weights (strict). A failure
    means model_args and weights do not belong together: one line naming the checkpoint `path`."""
    if ckpt.get("backbone") == "dreamrec":
        from train_diffusion import build_model
    else:
        from train_discriminative import build_model
    try:
        model = build_model(ckpt["model_args"]).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # TypeError, KeyError, RuntimeError, ... from files of unknown origin
        detail = " ".join(str(e).split())[:300]  # load_state_dict's message spans lines
        raise DataError(f"{path}: its model_args do not fit its weights ({type(e).__name__}: {detail})") from None
    return model.eval()


def parse_ks(parser, text):
    """--ks '10,20' -> [10, 20]: integers >= 1, in the order given, without repeats."""
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        parser.error(f"--ks {text!r}: expected comma-separated integers such as 10,20")
    if min(ks) < 1:
        parser.error(f"--ks {text!r}: every cut-off K must be at least 1")
    return list(dict.fromkeys(ks))


def popularity_scorer(meta, device):
    """Every user gets the same scores: the items' training popularity."""
    pop = torch.tensor(meta["item_popularity"], dtype=torch.float32, device=device)[:, None]  # (N+1, 1)
    return lambda seq: torch.ones(len(seq), 1, device=device), pop


def evaluate(scorer, data_dir, meta, split, ks, device, mask_history=False, sampled=0, seed=0, batch_size=1024):
    arrays = common.load_split(data_dir, split, meta["num_items"], meta["max_len"], len(meta["user_history_len"]))
    seq, target = (torch.from_numpy(arrays[k]).to(device) for k in ("seq", "target"))
    per_sample = full_ranking(scorer, seq, target, ks, batch_size, mask_history, sampled, seed)
    return common.group_means(per_sample, arrays["target"], arrays["user"], meta)


def open_run(path, device, data=None):
    """CKPT -> (checkpoint, DATA, meta.json), checked against each other: the same N and L.
    DATA is `data`, else the folder the checkpoint's config names."""
    ckpt = load_checkpoint(path, device)
    check_checkpoint(ckpt, path)
    data_dir = data or ckpt["config"].get("data")
    if not isinstance(data_dir, str):
        raise DataError(f"{path}: its config names no dataset folder; give --data DATA")
    meta = common.load_meta(data_dir)
    for key in ("num_items", "max_len"):  # a longer or shorter window would not fail, only mislead
        if meta[key] != ckpt["model_args"].get(key):
            raise DataError(f"{os.path.join(data_dir, 'meta.json')}: {key} {meta[key]}, "
                            f"but the checkpoint {path} has {ckpt['model_args'].get(key)}")
    return ckpt, data_dir, meta


def load_trained(args):
    """CKPT -> (scorer, DATA, meta.json, checkpoint), the checkpoint checked against DATA."""
    ckpt, data_dir, meta = open_run(args.ckpt, args.device, args.data)
    if args.eval_score:  # rank a SASRec checkpoint by another score than it was trained with
        if ckpt.get("backbone") == "dreamrec":
            raise DataError(f"{args.ckpt}: --eval_score is for SASRec checkpoints (DreamRec scores by x0_hat . e)")
        if args.eval_score == ckpt["model_args"].get("eval_score"):
            args.eval_score = None  # its own score: the trainer's protocol, and its file name
        else:
            ckpt["model_args"] = dict(ckpt["model_args"], eval_score=args.eval_score)
    return load_model(ckpt, args.device, args.ckpt).scorer(args.seed), data_dir, meta, ckpt


def default_out(args, ks, ckpt):
    """The FILE beside CKPT when there is no --out: metrics.json for the trainer's own protocol,
    else metrics_<parts>.json named from the options that differ from it (see the docstring)."""
    trained_on = ckpt["config"].get("data")
    if args.data and not (isinstance(trained_on, str) and os.path.isdir(trained_on)
                          and os.path.samefile(args.data, trained_on)):
        raise DataError(f"--data {args.data} is not the folder {args.ckpt} was trained on: give --out FILE")
    parts = []
    if args.split != "test":
        parts.append(args.split)
    if args.mask_history:
        parts.append("masked")
    if args.sampled:
        parts.append(f"sampled{args.sampled}")
    if ks != [10, 20]:
        parts.append("k" + ",".join(map(str, ks)))
    if args.eval_score:
        parts.append(args.eval_score)
    # the seed changes the numbers only where something is drawn; SASRec's full ranking draws nothing
    if args.seed and (args.sampled or ckpt.get("backbone") == "dreamrec"):
        parts.append(f"seed{args.seed}")
    return os.path.join(os.path.dirname(args.ckpt) or ".", "_".join(["metrics", *parts]) + ".json")


def run(args, ks):
    if args.popularity:
        if not args.data:
            raise DataError("--popularity needs --data DATA")
        if not args.out:  # DATA belongs to prepare.py, embed.py and decompose.py
            raise DataError("--popularity needs --out FILE (evaluate.py writes nothing into DATA)")
        meta = common.load_meta(args.data)
        scorer, data_dir, out = popularity_scorer(meta, args.device), args.data, args.out
    else:
        if not args.ckpt:
            raise DataError("give a checkpoint CKPT, or --popularity --data DATA --out FILE")
        scorer, data_dir, meta, ckpt = load_trained(args)
        out = args.out or default_out(args, ks, ckpt)
    common.check_output(out)  # the inputs first (a missing CKPT is the news), then out, before ranking
    if args.sampled > meta["num_items"] - meta["max_len"] - 1:
        raise DataError(f"--sampled {args.sampled}: only N - L - 1 = {meta['num_items'] - meta['max_len'] - 1} "
                        f"items are sure to lie outside a history window")
    results = {args.split: evaluate(scorer, data_dir, meta, args.split, ks, args.device,
                                    args.mask_history, args.sampled, args.seed, args.batch_size)}
    try:
        common.write_json(out, results)
    except OSError as e:
        raise DataError(f"{out}: cannot write ({e.strerror})") from None
    protocol = f"sampled ({args.sampled} negatives)" if args.sampled else "full ranking"
    scored = f", scored by {args.eval_score}" if args.eval_score else ""
    print(f"{args.split}, {protocol}{', history masked' if args.mask_history else ''}{scored}:")
    print(common.format_table(results))
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint CKPT (RUN/ckpt.pt)")
    p.add_argument("--data", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--popularity", action="store_true", help="evaluate the popularity recommender on --data instead")
    p.add_argument("--split", choices=["test", "valid"], default="test", help="which samples to rank")
    p.add_argument("--ks", default="10,20", help="cut-offs K >= 1 of HR@K, NDCG@K, MRR@K, comma-separated")
    p.add_argument("--mask_history", action="store_true", help="never recommend the history's items")
    p.add_argument("--sampled", type=int, default=0, help="rank against this many sampled items (LLM-ESR: 100; 0 = all)")
    p.add_argument("--eval_score", choices=["cosine", "dot"], default=None, help="rank a SASRec checkpoint by this "
                   "score instead of its own (the official code ranks by the raw dot product)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives and of diffusion sampling")
    p.add_argument("--batch_size", type=int, default=1024, help="samples scored at once")
    p.add_argument("--out", default=None, help="output JSON (required with --popularity; default: beside CKPT, "
                   "metrics.json for the trainer's protocol, else named from the options, e.g. metrics_masked.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, all cores)")
    args = p.parse_args(argv)
    ks = parse_ks(p, args.ks)
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: must be at least 1")
    if args.sampled < 0:
        p.error(f"--sampled {args.sampled}: must be >= 0 (0 ranks against all items)")
    if args.mask_history and args.sampled:
        p.error("--mask_history with --sampled changes nothing: "
                "the sampled items already lie outside the history window")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = check_device(p, args.device)
    try:
        run(args, ks)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        common.interrupted()


if __name__ == "__main__":
    main()
