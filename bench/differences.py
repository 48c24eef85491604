"""
The effect, on one trained run, of the deliberate differences from the official code that need
no second training run (the README's table "Where we differ from the official code").

    python bench/differences.py runs/converged/amazon-toys/sasrec_alphafuse_s0 runs/converged/amazon-toys/dreamrec_alphafuse_s0

For each RUN (RUN/ckpt.pt of train_discriminative.py or train_diffusion.py) on its test split:
- SASRec, the official query mask: the official attention multiplies a query row's attention by
  sign(|sum_j LN(x)_j|), meant to zero padding rows; a real row whose LayerNorm output sums to
  exactly 0.0 is zeroed too. Counted over the real rows of every block that the prediction reads
  (the last position; every position with --all_positions, as whole-sequence training reads them).
- DreamRec, the DDIM steps: ours calls the denoiser at --sample_steps evenly spaced t from T-1 to
  0 with the noise levels of those t; the official code calls it at t = T, T - s, ..., s, 0 (s =
  T / sample_steps, one step more) with the noise levels of steps T - 1, T - s - 1, ..., s - 1, 0.
  Test NDCG@20 and HR@20 of both, for --seeds of x_T (the spread of the seeds is the yardstick).
- Both, numerically zero language directions (eigenvalue < s_max * 1e-12; the official code turns
  them into unit-variance noise, decompose.py into 0): how many there are and how many of them lie
  in the kept d directions of the run's subspace.
Prints one block per RUN.
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import decompose  # noqa: E402
from evaluate import check_checkpoint, load_model  # noqa: E402
from model import full_ranking, load_checkpoint  # noqa: E402


def official_ddim_sample(model, c, generator):
    """train_diffusion.DreamRec.ddim_sample with the official code's steps: the denoiser at
    t = T, T - s, ..., 0 and the noise levels of t - 1 (of 0 at t = 0)."""
    s = model.T // model.sample_steps
    x = torch.randn(c.shape, device=c.device, generator=generator)
    x0_fn = model.guided_x0_fn(c)
    levels = [max(t - 1, 0) for t in range(model.T, -1, -s)]  # T-1, T-s-1, ..., s-1, 0
    for i, t in enumerate(range(model.T, -1, -s)):
        x0_hat = x0_fn(x, torch.tensor([t], device=c.device))
        abar = model.alphas_cumprod[levels[i]]
        abar_prev = model.alphas_cumprod[levels[i + 1]] if i + 1 < len(levels) else 1.0
        eps_hat = (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        x = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev) * eps_hat
    return x0_hat


def query_mask_rows(model, seq, all_positions, batch_size=1024):
    """(rows the official query mask zeroes although they are real items, real rows looked at),
    over every block of the SASRec encoder."""
    zeroed, seen = 0, 0
    ln_outputs = []
    hooks = [b.ln_q.register_forward_hook(lambda m, i, out: ln_outputs.append(out)) for b in model.encoder.blocks]
    try:
        with torch.no_grad():
            for i in range(0, len(seq), batch_size):
                s = seq[i:i + batch_size]
                ln_outputs.clear()
                model.user_state(s, model.table(), all_positions=True)
                real = s > 0  # (B, L)
                if not all_positions:
                    real = real & (torch.arange(s.shape[1]) == s.shape[1] - 1)
                for out in ln_outputs:  # (B, L, d)
                    zeroed += int(((out.sum(-1) == 0) & real).sum())
                    seen += int(real.sum())
    finally:
        for h in hooks:
            h.remove()
    return zeroed, seen


def zero_directions(subspace_path):
    """(numerically zero directions of the language covariance, how many of them are kept)."""
    sub = torch.load(subspace_path, weights_only=True)
    s = sub["eigenvalues"].double()
    zero = s < s[0] * decompose.ZERO_RTOL
    return int(zero.sum()), int(zero[:sub["lang_emb"].shape[1]].sum())


def run(args):
    for run_dir in args.runs:
        path = os.path.join(run_dir, "ckpt.pt")
        ckpt = load_checkpoint(path)
        check_checkpoint(ckpt, path)
        model = load_model(ckpt, "cpu", path).eval()
        data = common.load_dataset(ckpt["config"]["data"])[1]["test"]
        seq, target = torch.from_numpy(data["seq"]), torch.from_numpy(data["target"])
        print(f"{run_dir} ({len(target):,} test samples)")
        subspace = ckpt["config"].get("subspace")
        if ckpt["model_args"].get("item_emb") == "alphafuse" and subspace and os.path.exists(subspace):
            total, kept = zero_directions(subspace)
            print(f"  numerically zero language directions: {total}, of which {kept} in the kept d = "
                  f"{ckpt['model_args']['d']} ({subspace})")
        if ckpt.get("backbone") == "dreamrec":
            for name, sample in [("ours (t = T-1 .. 0)", None), ("official (t = T .. 0)", official_ddim_sample)]:
                if sample:
                    model.ddim_sample = lambda c, g: sample(model, c, g)
                for seed in args.seeds:
                    m = full_ranking(model.scorer(seed), seq, target)
                    print(f"  DDIM {name:22s} seed {seed}: test NDCG@20 {m['NDCG@20'].mean():.4f} "
                          f"HR@20 {m['HR@20'].mean():.4f}")
        else:
            zeroed, seen = query_mask_rows(model, seq, args.all_positions)
            print(f"  official query mask: zeroes {zeroed} of {seen:,} real query rows "
                  f"({'every' if args.all_positions else 'the last'} position, every block)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders RUN with ckpt.pt")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of DreamRec's x_T")
    p.add_argument("--all_positions", action="store_true", help="count the query mask at every real position, not only the last")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args)
    except common.DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        common.interrupted()


if __name__ == "__main__":
    main()
