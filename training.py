"""
The training loop both trainers share (train_discriminative.py, SASRec; train_diffusion.py,
DreamRec): the inputs of the item embeddings, the two training regimes (windows and whole
sequences), LLM-ESR's retrieval of similar users, seeded shuffled batches, progress lines, validation, early stopping, checkpoints,
--resume, log.jsonl, the stop at a non-finite loss, the final test; and the flags of all this.
Import only; nothing runs here.
"""

import ctypes
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import decompose
from common import DataError
from embeddings import RAW_INPUT, load_subspace
from model import check_device, full_ranking, load_checkpoint, save_checkpoint


def item_inputs(args, meta):
    """The language tensor the item embedding is built on, and the fields that describe it."""
    N = meta["num_items"]
    if args.item_emb in ("alphafuse", "llminit"):
        sub = load_subspace(args.subspace, N)
        d = sub["lang_emb"].shape[1]
        if d % args.num_heads:
            raise DataError(f"{args.subspace}: d = {d} is not divisible by --num_heads {args.num_heads}")
        return sub["lang_emb"], {"d_s": sub["d_s"], "hidden_dim": d}, \
            {"subspace": args.subspace, "subspace_settings": sub.get("settings"), "lang_emb_sha256": sub.get("lang_emb_sha256")}
    if args.item_emb in ("morec", "whitenrec", "unisrec", "rlmrec", "idreamrec", "llmesr"):
        path = os.path.join(args.data, "lang_emb.npy")
        emb = decompose.open_lang_emb(path)
        if len(emb) != N:
            raise DataError(f"{path}: {len(emb)} rows, meta.json says {N} items")
        if args.item_emb == "llmesr" and args.hidden_dim > emb.shape[1]:  # d PCA directions of d_l
            raise DataError(f"{path}: {emb.shape[1]}-d vectors, too few for --hidden_dim {args.hidden_dim} (llmesr's PCA)")
        if args.item_emb in RAW_INPUT:  # adapted (rlmrec: aligned to) as they are; make_item_embedding applies lang_scale
            features = np.concatenate([np.zeros((1, emb.shape[1]), np.float32), np.asarray(emb, np.float32)])
        else:  # whitenrec, idreamrec: whitened
            features = decompose.project(emb, *decompose.whitening(emb, path))
        dims = {"d_in": emb.shape[1]}
        if args.item_emb == "idreamrec":  # the whitened vectors are the items: d = d_l
            if emb.shape[1] % args.num_heads:
                raise DataError(f"{path}: d_l = {emb.shape[1]} is not divisible by --num_heads {args.num_heads}")
            dims["hidden_dim"] = emb.shape[1]
        return torch.from_numpy(features), dims, {"lang_emb_sha256": decompose.file_sha256(path)}
    return None, {}, {}


def embedding_args(args, dims):
    """The model_args that only some item embeddings have: the width d_in of their language input
    (item_inputs' dims), UniSRec's G, RLMRec's variant and tau, the RAW_INPUT baselines' lang_scale.
    Only for those: the model_args of the other runs, which --resume compares, stay as they were."""
    extra = {"d_in": dims["d_in"]} if "d_in" in dims else {}
    if args.item_emb in RAW_INPUT and args.lang_scale != 1:  # absent at 1: the runs from before the flag
        extra["lang_scale"] = args.lang_scale
    if args.item_emb == "unisrec":
        extra["experts"] = args.experts
    if args.item_emb == "rlmrec":
        extra.update(align=args.align, align_temperature=args.align_temperature)
    return extra


def with_alignment(loss_fn, item_emb, weight):
    """loss_fn plus weight * RLMRec's L_info (embeddings.RLMRecEmbedding.aux_loss) over the step's
    targets, the batch's positive items, each against the others, as the authors' code aligns its
    batch's positive items; loss_fn itself for an item embedding without that loss. Every training
    item is the target of some window, so an epoch aligns them all; adding the histories (about 5x
    the distinct items of a window batch, and L_info is quadratic in them) tripled the CPU time of
    an amazon-toys epoch (31-36 s against 10-11 s for id; targets only: 13-15 s), with the same
    validation NDCG@20 over 3 epochs."""
    if not hasattr(item_emb, "aux_loss"):
        return loss_fn
    return lambda seq, target, *user: loss_fn(seq, target, *user) + weight * item_emb.aux_loss(target)


def param_groups(model, num_items, cold):
    """The optimizer's parameter groups: model.parameters(), except that an item table (N+1, ·) whose
    cold rows are not zero (llminit's table, --train_lang's language rows) takes no weight decay.
    keep_rows zeroes their gradient, but the decay (Adam's, added to that gradient; AdamW's, applied
    to the weights) would still shrink rows that must stay as a new item's."""
    held = [p for p in model.item_emb.parameters() if cold and p.dim() == 2 and len(p) == num_items + 1
            and p[cold].any()]
    if not held:
        return model.parameters()
    return [{"params": [p for p in model.parameters() if all(p is not h for h in held)]},
            {"params": held, "weight_decay": 0.0}]


def whole_sequences(train):
    """Windows (seq (n, L), target (n,), user (n,)) -> one whole sequence per training user, its
    last L + 1 training items: seq (U, L) and target (U, L), the item after each position (0 after
    padding), and user (U,), ascending. The last window of a user holds exactly those items:
    prepare.py writes each user's windows in time order."""
    user = train["user"].cpu().numpy()
    last = len(user) - 1 - np.unique(user[::-1], return_index=True)[1]  # each user's last window
    last = torch.from_numpy(last).to(train["seq"].device)
    seq, target = train["seq"][last], train["target"][last]  # (U, L), (U,)
    nxt = torch.cat([seq[:, 1:], target[:, None]], 1)  # (U, L)
    return {"seq": seq, "target": nxt.masked_fill(seq == 0, 0), "user": train["user"][last]}


def similar_users(train, features, n, num_users):
    """LLM-ESR's retrieval ("Retrieval Augmented Self-Distillation"): each training user's n most
    similar other training users by the cosine of their LLM user embeddings. The paper embeds a
    prompt of the user's interactions with the LLM; we have no user texts, so a user's LLM embedding
    is the mean of the LLM embeddings (features (N+1, d_l)) of the user's training items: every
    window's target and the first window's history item, the whole training sequence, no valid or
    test target. train: windows (seq (n, L), target (n,), user (n,)) tensors. Returns similar
    (num_users, n) user indices, never the user itself (rows of users without training windows
    are unused), and teacher_seq (num_users, L), each training user's last L training items."""
    user, seq, target = train["user"], train["seq"], train["target"]
    users, first = (torch.from_numpy(a) for a in np.unique(user.numpy(), return_index=True))  # (T,) each
    items = torch.cat([target, seq[first, -1]])  # every training item of every user once
    emb = torch.zeros(num_users, features.shape[1]).index_add_(0, torch.cat([user, users]), features[items])
    emb = F.normalize(emb[users], dim=1)  # (T, d_l); the mean's direction is the sum's
    n = min(n, len(users) - 1)
    similar = torch.zeros(num_users, n, dtype=torch.long)
    for i in range(0, len(users), 1024):  # (1024, T) similarities at a time
        sim = emb[i:i + 1024] @ emb.T
        sim[torch.arange(len(sim)), torch.arange(i, i + len(sim))] = float("-inf")  # not the user itself
        similar[users[i:i + 1024]] = users[sim.topk(n, dim=1).indices]
    whole = whole_sequences(train)
    teacher_seq = torch.zeros(num_users, seq.shape[1], dtype=torch.long)
    teacher_seq[whole["user"]] = torch.cat([whole["seq"][:, 1:], whole["target"][:, -1:]], 1)
    return similar, teacher_seq


def set_teachers(model, args, meta, features):
    """The teachers of LLM-ESR's self-distillation (--item_emb llmesr, --alpha > 0): model.similar
    (U, N) and model.teacher_seq (U, L) from the training windows only, the LLM embeddings
    `features` (N+1, d_l) ranking the users. None otherwise, nor for a single training user, who
    has no other to learn from."""
    if args.item_emb != "llmesr" or not args.alpha:
        return
    train = {k: torch.from_numpy(v) for k, v in common.load_split(args.data, "train", meta["num_items"]).items()}
    similar, teacher_seq = similar_users(train, features, args.sim_users, len(meta["user_history_len"]))
    if similar.shape[1]:
        device = next(model.parameters()).device
        model.similar, model.teacher_seq = similar.to(device), teacher_seq.to(device)


def keep_freed_memory():
    """glibc gives blocks over 128 KB back to the OS when they are freed, and the next step's
    tensors of the same sizes fault them back in page by page: a fifth of a CPU step at
    amazon-toys' sizes. Serve blocks up to 32 MB (glibc's cap) from the heap and keep it instead.
    Nothing changes where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap


def loop_defaults(args, meta):
    """Settings of the loop that depend on the data or the machine, resolved before the run starts."""
    args.train_on = args.train_on or ("sequences" if meta.get("split") == "loo" else "windows")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()


def keep_log_until(path, epoch):
    """Drop the lines of log.jsonl after `epoch`, the epoch of the last.pt a run resumes from: a
    run stopped (Ctrl-C, kill) between an epoch's log line and its checkpoint runs that epoch again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epoch]
    with common.atomic_open(path, "w") as f:
        f.writelines(lines)


def validate(model, split, ks=(10, 20), batch_size=1024, seed=0):
    model.eval()
    m = full_ranking(model.scorer(seed), split["seq"], split["target"], ks, batch_size)
    model.train()
    return {k: float(v.mean()) for k, v in m.items()}


def make_run_dir(path):
    """Create RUN once every input is checked (so a bad input leaves no folder behind), and fail
    now rather than after the first epoch if it can't be written; returns whether this run made it."""
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DataError(f"{path}: cannot create the run folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{path}: the run folder is not writable")
    return created


def diverged(run, what, last_good, created):
    """The error that stops a run whose loss is no longer finite: every later checkpoint would be
    worthless, so the last good one stays as it is (and an empty RUN that this run made goes)."""
    if created and not last_good and not os.listdir(run):
        os.rmdir(run)
    return DataError(f"{run}: {what}; " + (f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"))


def fit(args, model, model_args, optimizer, loss_fn, gens, backbone, config):
    """The training loop both backbones share: seeded shuffled (or --file_order) batches of device-resident data,
    validation NDCG@20 every --eval_every epochs, best and last checkpoints, early stopping after
    --patience evaluations without improvement, --resume, log.jsonl, a stop at a NaN or inf loss;
    then the best checkpoint is evaluated once on test. loss_fn(seq, target, user) -> scalar; gens: the seeded generators."""
    device = next(model.parameters()).device
    gens = dict(gens, torch=torch.default_generator)  # dropout draws from the global generator
    if device.type == "cuda":
        gens["cuda"] = torch.cuda.default_generators[device.index or 0]
    meta, splits = common.load_dataset(args.data, allow_empty=False)  # an empty split would fail only after training
    data = {s: {k: torch.from_numpy(v).to(device) for k, v in a.items()} for s, a in splits.items()}
    log_path = os.path.join(args.out, "log.jsonl")
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "ckpt.pt")
    epoch, best_val, bad_evals = 0, -1.0, 0
    resume = args.resume and os.path.exists(last_path)
    if args.resume and not resume:
        print(f"{last_path} does not exist yet: a new run starts")
    if resume:
        ck = load_checkpoint(last_path, device)
        if ck["model_args"] != model_args:
            changed = sorted(k for k in model_args if ck["model_args"].get(k) != model_args[k])
            raise DataError(f"{last_path}: the model settings differ from the checkpoint's ({', '.join(changed)})")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        epoch, best_val, bad_evals = ck["epoch"], ck["best_val"], ck["bad_evals"]
        for name, g in gens.items():
            g.set_state(ck["generators"][name].cpu())
        keep_log_until(log_path, epoch)
        print(f"resumed {last_path} at epoch {epoch}")
    created, last_good = make_run_dir(args.out), last_path if resume else None  # every input is checked
    if not resume and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    train = data["train"] if args.train_on == "windows" else whole_sequences(data["train"])
    n = len(train["target"])
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")
    print(f"{backbone} {args.item_emb}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
          f"trainable parameters, {n:,} training {args.train_on}, device {device}, {torch.get_num_threads()} threads")
    while epoch < args.epochs and bad_evals < args.patience:
        epoch += 1
        t0, cpu0, shown, total = time.time(), time.process_time(), time.time(), 0.0
        model.train()
        perm = torch.arange(n, device=device) if args.file_order else torch.randperm(n, generator=gens["perm"]).to(device)
        for step, i in enumerate(range(0, n, args.batch_size), 1):
            idx = perm[i:i + args.batch_size]
            with amp:
                loss = loss_fn(train["seq"][idx], train["target"][idx], train["user"][idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()  # the per-step sync this loop already pays; a NaN or inf stops the run
            if not math.isfinite(value):
                raise diverged(args.out, f"loss became {value} at epoch {epoch} step {step}", last_good, created)
            total += value * len(idx)
            if time.time() - shown > args.progress_every:  # a slow machine is never silent for long
                shown, rate = time.time(), (i + len(idx)) / (time.time() - t0)
                print(f"epoch {epoch:3d} | step {step}/{-(-n // args.batch_size)} | {rate:,.0f} {args.train_on}/s"
                      f" | ETA {(n - i - len(idx)) / rate:.0f}s", flush=True)
        seconds = time.time() - t0
        record = {"epoch": epoch, "loss": total / n, "seconds": round(seconds, 2),
                  "cpu_seconds": round(time.process_time() - cpu0, 2), "samples_per_s": round(n / seconds)}
        improved = False
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            t0 = time.time()
            record["valid"] = validate(model, data["valid"])  # float32 scores: bf16 would make ties
            record["valid_seconds"] = round(time.time() - t0, 2)
            improved = record["valid"]["NDCG@20"] > best_val
            best_val, bad_evals = (record["valid"]["NDCG@20"], 0) if improved else (best_val, bad_evals + 1)
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                "config": config, "epoch": epoch, "best_val": best_val, "bad_evals": bad_evals, "backbone": backbone,
                "generators": {name: g.get_state() for name, g in gens.items()}}
        with open(log_path, "a") as f:  # first: a line whose epoch last.pt lacks is dropped by --resume
            f.write(json.dumps(record) + "\n")
        if improved:
            save_checkpoint(best_path, **ckpt)
        save_checkpoint(last_path, **ckpt)
        last_good = last_path
        val = record.get("valid")
        val_text = f" | valid NDCG@20 {val['NDCG@20']:.4f} HR@20 {val['HR@20']:.4f}" if val else ""
        print(f"epoch {epoch:3d} | loss {record['loss']:.4f}{val_text} | {seconds:.1f}s, {n / seconds:,.0f} {args.train_on}/s",
              flush=True)
    best = load_checkpoint(best_path, device)
    model.load_state_dict(best["model"])
    model.eval()
    per_sample = full_ranking(model.scorer(0), data["test"]["seq"], data["test"]["target"])
    results = {"test": common.group_means(per_sample, splits["test"]["target"], splits["test"]["user"], meta)}
    common.write_json(os.path.join(args.out, "metrics.json"), results)
    print(f"best epoch {best['epoch']} (valid NDCG@20 {best['best_val']:.4f}); test, full ranking:")
    print(common.format_table(results))


def add_loop_args(p):
    """The encoder and training-loop flags both trainers share."""
    p.add_argument("--num_blocks", type=int, default=1, help="Transformer blocks of the SASRec encoder")
    p.add_argument("--num_heads", type=int, default=1, help="attention heads")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout rate of the encoder")
    p.add_argument("--batch_size", type=int, default=256, help="samples per step: windows, or whole sequences")
    p.add_argument("--train_on", choices=["sequences", "windows"], default=None, help="whole sequences, every position predicting its next item (SASRec, LLM-ESR), or one sample per target (official AlphaFuse); default: sequences for --split loo data, windows for user")
    p.add_argument("--file_order", action="store_true", help="batches in the training file's order every epoch, as the official code's DataLoader (default: a seeded shuffle per epoch)")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs")
    p.add_argument("--patience", type=int, default=10, help="stop after this many evaluations without a better valid NDCG@20")
    p.add_argument("--eval_every", type=int, default=1, help="epochs between validations")
    p.add_argument("--seed", type=int, default=22, help="seed of the initialisation, the batch order and the sampling")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (scores for ranking stay float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, all cores)")
    p.add_argument("--progress_every", type=float, default=10.0, help="seconds between progress lines inside an epoch")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt, or start when there is none yet "
                   "(without it, a RUN holding last.pt is refused)")


# RLMRec's (weight, tau) per --align: the authors' Amazon settings (HKUDS/RLMRec encoder/config/modelconf:
# lightgcn_plus.yml kd_weight, kd_temperature; lightgcn_gene.yml recon_weight, re_temperature)
ALIGN_DEFAULTS = {"con": (0.01, 0.2), "gen": (0.1, 0.5)}


def add_language_args(p):
    """The flags of the baselines' language input, the same in both trainers."""
    p.add_argument("--experts", type=int, default=8, help="G, the parametric whitening experts of UniSRec's MoE adaptor (unisrec)")
    p.add_argument("--lang_scale", type=float, default=40.0, help="factor on the unit-norm language vectors fed to morec, unisrec, rlmrec and llmesr (the official code's language_embs_scale; 1: the vectors as embed.py wrote them)")


def add_align_args(p):
    """RLMRec's flags (--item_emb rlmrec), the same in both trainers."""
    p.add_argument("--align", choices=["con", "gen"], default="con", help="RLMRec's alignment (rlmrec): con, sigma_down(s_i) against e_i (RLMRec-Con), or gen, sigma_up(e_i) against s_i (RLMRec-Gen)")
    p.add_argument("--align_weight", type=float, default=None, help="weight of RLMRec's alignment loss L_info in the total loss (rlmrec; default: the authors' Amazon setting, 0.01 con, 0.1 gen)")
    p.add_argument("--align_temperature", type=float, default=None, help="tau of RLMRec's density ratio f = exp(cos / tau) (rlmrec; default: the authors' Amazon setting, 0.2 con, 0.5 gen)")


def add_distill_args(p):
    """LLM-ESR's self-distillation flags (--item_emb llmesr), the same in both trainers."""
    p.add_argument("--alpha", type=float, default=0.1, help="alpha, weight of LLM-ESR's self-distillation loss L_sd (llmesr; 0: none)")
    p.add_argument("--sim_users", type=int, default=10, help="N, retrieved similar users whose mean state is the teacher (llmesr)")


# the intervals of the shared flags: seeds are NumPy's; above ~3e37 a float32 Adam step overflows
LOOP_RANGES = {**dict.fromkeys(("hidden_dim", "num_blocks", "num_heads", "batch_size", "epochs", "patience", "eval_every",
                                "experts"), "[1, inf)"),
               "dropout": "[0, 1)", "lr": "(0, 1e37)", "weight_decay": "[0, 1e37)", "seed": "[0, 4294967296)",
               "align_weight": "[0, 1e37)", "lang_scale": "(0, 1e37)", "align_temperature": "(0, 1e37)", "alpha": "[0, 1e37)", "sim_users": "[1, inf)"}


def interrupted(args):
    """Ctrl-C in a trainer: one line saying what is kept, exit 130. Checkpoints are written whole
    or not at all, so RUN/last.pt holds the last finished epoch."""
    last = os.path.join(args.out, "last.pt")
    if not os.path.exists(last):
        common.interrupted("no epoch had finished, nothing was kept")
    epoch = load_checkpoint(last)["epoch"]
    common.interrupted(f"{last} keeps epoch {epoch}: rerun " + ("the same command" if args.resume else "with --resume") + " to continue")


def check_loop_args(p, args, ranges):
    """Refuse a flag outside its interval (LOOP_RANGES, then the trainer's own `ranges`; NaN is in
    none) before anything is read or written: parser.error, one line, exit 2. Fills in the defaults
    of --align_weight and --align_temperature, which depend on --align."""
    weight, tau = ALIGN_DEFAULTS[args.align]
    args.align_weight = weight if args.align_weight is None else args.align_weight
    args.align_temperature = tau if args.align_temperature is None else args.align_temperature
    for flag, interval in {**LOOP_RANGES, **ranges}.items():
        v, (lo, hi) = getattr(args, flag), map(float, interval[1:-1].split(","))
        if not ((lo < v if interval[0] == "(" else lo <= v) and (v < hi if interval[-1] == ")" else v <= hi)):
            p.error(f"--{flag} must be in {interval}, got {v}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be in [1, inf), got {args.threads}")
    args.device = check_device(p, args.device)
    last = os.path.join(args.out, "last.pt")
    if not args.resume and os.path.exists(last):  # a fresh start would replace its checkpoints and log
        sys.exit(f"error: {last}: --out {args.out} holds a run; add --resume to continue it, or give a new --out")
    if not args.progress_every >= 0:
        p.error(f"--progress_every must be in [0, inf), got {args.progress_every}")
    if args.item_emb not in ("alphafuse", "llminit", "idreamrec") and args.hidden_dim % args.num_heads:  # else d is d_l
        p.error(f"--num_heads {args.num_heads} must divide --hidden_dim {args.hidden_dim}")
