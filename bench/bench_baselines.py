"""
Benchmark of the SASRec baselines' training cost on amazon-toys, one thread: the CPU seconds of a
step (256 windows, InfoNCE with 64 negatives) for every --item_emb, and an epoch's extrapolated
from them; and for the two item embeddings that rewrite their equations for speed, UniSRec's MoE
adaptor and LLM-ESR's semantic view, the forward and backward of all N items as the equations read
(bench/reference.py) against ours, on the same weights, with the largest difference of the outputs.

    python bench/bench_baselines.py                    # amazon-toys from ../shared/data
    python bench/bench_baselines.py --toys data/toys --steps 20

--toys: a prepared DATA with lang_emb.npy; without it amazon-toys is prepared into a temporary
folder with random unit-row 384-d language embeddings (times depend on shapes, not values). CPU
seconds (time.process_time) are the mean over --steps steps after 2 warm-up steps, so another
process on the machine changes them little. Prints one line per figure.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
import reference  # noqa: E402
import train_discriminative  # noqa: E402
import training  # noqa: E402
from bench_train import make_data  # noqa: E402

ITEM_EMBS = ("alphafuse", "id", "llminit", "rlmrec", "morec", "whitenrec", "unisrec", "llmesr")
# the item embeddings that rewrite their equations for speed: (name, as written, ours), each (emb, x) -> (N+1, d)
WRITTEN = {"unisrec": ("UniSRec MoE adaptor", reference.unisrec_items, lambda emb, x: emb.adapt(x)),
           "llmesr": ("LLM-ESR semantic view", reference.llmesr_semantic, lambda emb, x: emb.semantic(x))}


def cpu_seconds(fn, steps):
    """Mean CPU seconds of fn() over `steps` calls, after 2 warm-up calls."""
    for _ in range(2):
        fn()
    t0 = time.process_time()
    for _ in range(steps):
        fn()
    return (time.process_time() - t0) / steps


def build(item_emb, data, subspace, meta, out):
    """train_discriminative's model and settings for `--item_emb item_emb`, every other flag at its
    default (the run folder `out` is never written), LLM-ESR's teachers set: (model, args)."""
    args = train_discriminative.parse_args([data, "--out", out, "--item_emb", item_emb, "--subspace", subspace,
                                            "--device", "cpu"])
    init, dims, _ = training.item_inputs(args, meta)
    model = train_discriminative.build_model(train_discriminative.model_args_of(args, meta, dims), init)
    training.set_teachers(model, args, meta, init)
    return model.train(), args


def step_seconds(model, args, train, steps, g):
    """CPU seconds of one training step of `model`, as train_discriminative runs it with `args`."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    loss_fn = training.with_alignment(
        lambda s, t, u: model.loss(s, t, args.loss, args.neg_ratio, g, user=u, alpha=args.alpha),
        model.item_emb, args.align_weight)

    def step():
        i = torch.randint(0, len(train["target"]), (args.batch_size,), generator=g)
        loss = loss_fn(train["seq"][i], train["target"][i], train["user"][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cpu_seconds(step, steps)


def table_seconds(items, params, steps):
    """CPU seconds of items() (N+1, d) forward and backward, and the output once (no grad)."""
    def fwd_bwd():
        items().square().sum().backward()
        for p in params:
            p.grad = None
    with torch.no_grad():
        out = items()
    return cpu_seconds(fwd_bwd, steps), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--toys", default=None, help="prepared amazon-toys DATA with lang_emb.npy (default: prepared from ../shared/data)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    training.keep_freed_memory()
    tmp = tempfile.mkdtemp(prefix="bench_baselines_")
    try:
        data, subspace, _ = make_data(os.path.join(REPO, "..", "shared", "data", "amazon-toys"), args.toys, "user", tmp)
        meta, splits = common.load_dataset(data)
        train = {k: torch.from_numpy(v) for k, v in splits["train"].items()}
        steps_per_epoch = -(-len(train["target"]) // 256)
        print(f"amazon-toys: N = {meta['num_items']:,}, {len(train['target']):,} windows ({steps_per_epoch} steps of 256); "
              f"one thread, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
        g = torch.Generator().manual_seed(0)
        for item_emb in ITEM_EMBS:
            torch.manual_seed(0)
            model, run_args = build(item_emb, data, subspace, meta, os.path.join(tmp, "run"))
            s = step_seconds(model, run_args, train, args.steps, g)
            print(f"  {item_emb:<10} {s:.3f} CPU-s per step, ~{s * steps_per_epoch:.0f} per epoch")
            emb = model.item_emb
            if item_emb not in WRITTEN:
                continue
            name, written, ours = WRITTEN[item_emb]
            emb.eval()  # no dropout or gate noise, so that both give the same numbers
            slow, a = table_seconds(lambda: written(emb, emb.features), list(emb.parameters()), args.steps)
            fast, b = table_seconds(lambda: ours(emb, emb.features), list(emb.parameters()), args.steps)
            print(f"    {name}, all items forward and backward: as written {slow:.3f} CPU-s, ours {fast:.3f} "
                  f"({slow / fast:.1f}x less); largest difference {(a - b).abs().max():.1e} (|v| <= {a.abs().max():.1f})")
    except common.DataError as e:
        sys.exit(f"error: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
