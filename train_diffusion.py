"""
Train DreamRec (a conditional diffusion model that generates the next item's embedding) with
AlphaFuse item embeddings or a baseline's, then evaluate the best checkpoint once on test.

    python decompose.py data/toys --null_thres 0.25 --out data/toys/subspace_dreamrec.pt   # d = d_l
    python train_diffusion.py data/toys --out runs/toys_dreamrec --subspace data/toys/subspace_dreamrec.pt
    python train_diffusion.py data/toys --out runs/toys_dreamrec_id --item_emb id

--item_emb   alphafuse  frozen standardized language coordinates of --subspace (d = d_l) + trainable
                        ID vectors in its null coordinates d_s..d
             id         a trainable table (N+1, --hidden_dim): DreamRec itself
             llminit    a trainable table (N+1, d_l) initialised from --subspace's coordinates
             morec      frozen language embeddings (lang_emb.npy) x --lang_scale -> MLP adapter -> --hidden_dim
             whitenrec  frozen whitened language embeddings (all d_l directions) -> the same adapter
             unisrec    frozen language embeddings x --lang_scale -> UniSRec's MoE adaptor -> --hidden_dim
             idreamrec  iDreamRec: the frozen whitened language embeddings are the items (d = d_l;
                        no adapter, no ID; embeddings.FrozenEmbedding)
             llmesr     LLM-ESR's items and encoder (embeddings.DualViewEmbedding, model.DualViewEncoder):
                        items [e^co, e^se] and condition [u^co, u^se] of D = 2d (d = --hidden_dim per
                        view), so x0, the denoiser, the step MLP and the null vector work at D, and
                        x0_hat . e_i is the dot product over both views; plus --alpha times the
                        self-distillation of c towards --sim_users similar users (model.self_distillation)
The item embeddings are train_discriminative.py's (embeddings.make_item_embedding).

The condition c (B, d) is the SASRec encoder's state of the history (SASRecEncoder over the
same item embeddings; llmesr: DualViewEncoder's [u^co, u^se], D = 2d). The denoiser f(x_t, c, t) predicts x0 with one Linear over
[x_t, c, MLP(sinusoid(t))] (the official architecture); training minimises ||f - x0||^2 with
x0 = e_target, t ~ U{0..T-1}, and c replaced by a learned null vector with probability p_uncond.
Sampling is deterministic DDIM over --sample_steps evenly spaced steps from T-1 down to 0, with
classifier-free guidance x0_hat = (1 + w) f(x_t, c, t) - w f(x_t, null, t); items are scored by
x0_hat . e_i. Evaluation draws x_T from its own generator seeded by --seed, so a checkpoint always
gives the same metrics.
Reads and writes the same files as train_discriminative.py (RUN/ckpt.pt, last.pt, log.jsonl,
metrics.json) and prints the same lines.

NOTE where this differs from the official code: the first DDIM step is t = T-1, not T (outside the
trained range); schedules are computed in float64; batches are shuffled (--file_order for the
official fixed order). Its baselines (models/backbone_DreamRec.py) take d = --hidden_dim, which its
README sets to d_l (1536, 3072) for every DreamRec run; here:
- morec, whitenrec adapt to --hidden_dim (128) with Linear, GELU, Linear; its adapter is one
  Linear(d_l, d) and a GELU. The adapter's output is x0, what the diffusion generates, and the table
  x0_hat is scored against: after a last GELU every coordinate of every item is >= -0.17, all items
  share one offset direction and x0 is far from the centred Gaussian the noise is; a last Linear
  leaves it free. The SASRec trainer uses the same MLP, so each baseline is one thing in both backbones.
  A trained adapter can map every item to one point, where the loss on x0 is ~0: on amazon-toys at
  lr 1e-3 morec and whitenrec (with this MLP or its one layer) do so within an epoch, as id does.
- llmesr: its LLMESR class conditions on the two views' states too, but its train_diffusion.py adds
  no self-distillation (nor the class's unused contrastive reg_loss), feeds the semantic sequence in
  place of the collaborative one (id_seq = emb_dropout(inputs_text_emb)), and its cross-attention
  masks padding only, not the future; here both views are encoded as train_discriminative.py's
  llmesr, with --alpha times its self-distillation.
- llminit starts from the standardized coordinates (E - mu) U diag(s)^(-1/2) of --subspace, as the
  SASRec trainer's and as AlphaFuse's frozen part, so that it differs from AlphaFuse only in what
  trains; its LLMInit starts from the raw vectors times 40 (at d = d_l it skips its decomposition).
Cold items (prepare.py --cold_items) are never touched: zero ID rows, llminit's language rows
(which then take no weight decay, as in train_discriminative.py: training.param_groups).
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import common
from common import DataError
from embeddings import make_item_embedding
from model import DualViewEncoder, SASRecEncoder, seed_everything, self_distillation
from training import (add_align_args, add_distill_args, add_language_args, add_loop_args, check_loop_args, embedding_args, fit,
                      interrupted, item_inputs, loop_defaults, param_groups, set_teachers, with_alignment)


def beta_schedule(schedule, T, beta_start, beta_end):
    """(T,) float64 betas: linear from beta_start to beta_end, or the cosine schedule of
    Nichol & Dhariwal (2021) with s = 0.008 and betas clipped at 0.999."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


STEP_FREQUENCIES = 256  # the sinusoid's size before the step MLP (the official TimestepEmbedder's)


def timestep_embedding(t, d=STEP_FREQUENCIES):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, d), as the Transformer's positions."""
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / max(half - 1, 1))
    angles = t.float()[:, None] * freqs  # (B, d/2)
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, d % 2))


class DreamRec(torch.nn.Module):

    def __init__(self, item_emb, num_items, d, max_len, num_blocks, num_heads, dropout, timesteps,
                 beta_start, beta_end, schedule, w, p_uncond, sample_steps, d_s=0, id_init="normal", init=None, cold=(),
                 d_in=0, experts=8, align="con", align_temperature=0.2, lang_scale=1.0):
        super().__init__()
        self.num_items, self.T, self.w, self.p_uncond, self.sample_steps = num_items, timesteps, w, p_uncond, sample_steps
        # cold items (training only): untouched rows (zero ID rows, llminit's language rows); DreamRec
        # draws no negatives, and no history or target of training holds a cold item
        self.item_emb = make_item_embedding(item_emb, num_items, d, d_in, d_s, id_init, False, False, init, cold, experts,
                                            align, align_temperature, lang_scale)
        self.encoder = (DualViewEncoder if item_emb == "llmesr" else SASRecEncoder)(d, max_len, num_blocks, num_heads, dropout)
        d = 2 * d if item_emb == "llmesr" else d  # D: llmesr's items and states are two views of d side by side
        self.null_c = torch.nn.Parameter(torch.randn(d))  # the unconditional "condition", N(0, 1) as the official code
        # t -> 256-d sinusoid -> Linear, GELU, Linear -> (B, d): the official DreamRec step embedding
        self.step_mlp = torch.nn.Sequential(torch.nn.Linear(STEP_FREQUENCIES, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        self.denoiser = torch.nn.Linear(3 * d, d)
        alphas_cumprod = torch.cumprod(1 - beta_schedule(schedule, timesteps, beta_start, beta_end), 0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("all_items", torch.arange(num_items + 1), persistent=False)
        # llmesr's teachers of the self-distillation (similar (U, N), teacher_seq (U, L)), set by
        # training.set_teachers: training only, not in the checkpoint
        self.register_buffer("similar", None, persistent=False)
        self.register_buffer("teacher_seq", None, persistent=False)

    def condition(self, seq, all_positions=False):  # (B, L) -> c (B, D), or (B, L, D)
        return self.encoder(self.item_emb(seq), seq, all_positions)

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), t (B,) in [0, T-1]."""
        abar = self.alphas_cumprod[t][:, None]  # (B, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t, c, t):  # f(x_t, c, t) -> (B, d)
        t_emb = self.step_mlp(timestep_embedding(t))
        return self.denoiser(torch.cat([x_t, c, t_emb], dim=1))

    def guided_x0(self, x_t, c, t):
        """Classifier-free guidance: (1 + w) f(x_t, c, t) - w f(x_t, null, t)."""
        uncond = self.predict_x0(x_t, self.null_c.expand_as(c), t)
        return (1 + self.w) * self.predict_x0(x_t, c, t) - self.w * uncond

    def guided_x0_fn(self, c):
        """guided_x0 for a fixed condition c (B, d), as a function of (x_t (B, d), t (1,)). f is one
        Linear over [x_t, c, t_emb], so the guided prediction is W_x x_t + W_t t_emb + b
        + W_c ((1 + w) c - w null), whose last terms are the same at every DDIM step: a step costs
        one (B, d) x (d, d) product instead of two of (B, 3d) x (3d, d), 6x less."""
        W_x, W_c, W_t = self.denoiser.weight.split(c.shape[1], dim=1)  # 3 x (d, d)
        fixed = F.linear((1 + self.w) * c - self.w * self.null_c, W_c, self.denoiser.bias)  # (B, d)
        return lambda x_t, t: x_t @ W_x.T + (self.step_mlp(timestep_embedding(t)) @ W_t.T + fixed)

    def loss(self, seq, target, generator, user=None, alpha=0.0):
        """seq (B, L) and target (B,) (windows), or target (B, L), the item after every position,
        0 after padding (whole sequences: every real position conditions one x0). With teachers
        (llmesr), the samples' users (B,) and alpha > 0, plus alpha L_sd on the condition of each
        sample's last position, before it is dropped for the null vector (LLM-ESR's L_sd on the user state)."""
        distill, real = None, None
        if target.dim() == 2:
            # every position enters, padding weighted 0: a batch of B sequences is always B L rows.
            # Gathering the P real ones gave each batch its own row count, and oneDNN caches one
            # primitive per shape (the step MLP's GELU): ml-1m's RSS grew ~50 MB a step, 9.7 GB by epoch 15
            states = self.condition(seq, all_positions=True)  # (B, L, D)
            c, last = states.flatten(0, 1), states[:, -1]  # (B L, D), (B, D)
            target = target.flatten()  # (B L,)
            real = target > 0
        else:
            c = last = self.condition(seq)  # (B, D)
        if alpha and user is not None and self.similar is not None:
            distill = alpha * self_distillation(self.condition, last, user, self.similar, self.teacher_seq)
        x0 = self.item_emb(target)  # (B, D)
        drop = torch.rand(len(c), 1, device=c.device, generator=generator) < self.p_uncond
        c = torch.where(drop, self.null_c.expand_as(c), c)
        t = torch.randint(0, self.T, (len(c),), device=c.device, generator=generator)
        noise = torch.randn(x0.shape, device=c.device, generator=generator)
        x0_hat = self.predict_x0(self.q_sample(x0, t, noise), c, t)
        if real is None:
            loss = F.mse_loss(x0_hat, x0)
        else:  # the mean over the real positions' x0 coordinates
            loss = (x0_hat - x0).square().mean(1)[real].mean()
        return loss if distill is None else loss + distill

    def sample_timesteps(self):
        """sample_steps evenly spaced integers from T-1 down to 0, all inside the trained range."""
        return torch.linspace(self.T - 1, 0, self.sample_steps, dtype=torch.float64).round().long().tolist()

    @torch.no_grad()
    def ddim_sample(self, c, generator):
        """Deterministic DDIM (eta = 0): x_T ~ N(0, I), then at each step t -> t_prev
        x_{t_prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat, eps_hat implied by x0_hat."""
        x = torch.randn(c.shape, device=c.device, generator=generator)
        x0_fn, steps = self.guided_x0_fn(c), self.sample_timesteps()
        for t, t_prev in zip(steps, steps[1:] + [-1]):
            x0_hat = x0_fn(x, torch.tensor([t], device=c.device))
            abar, abar_prev = self.alphas_cumprod[t], self.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
            eps_hat = (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
            x = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev) * eps_hat
        return x0_hat

    @torch.no_grad()
    def scorer(self, seed=0):
        """The scores of one evaluation as (query, table): query(seq) -> x0_hat (B, d), drawn with
        its own generator seeded by `seed`, and the item table (N+1, d); scores = x0_hat . e_i."""
        generator = torch.Generator(device=self.all_items.device).manual_seed(seed)
        return lambda seq: self.ddim_sample(self.condition(seq), generator), self.item_emb(self.all_items)


def build_model(model_args, init=None, cold=()):
    return DreamRec(**model_args, init=init, cold=cold)


def run(args):
    device = args.device  # checked and resolved by check_loop_args
    gens = {"perm": seed_everything(args.seed),
            "noise": torch.Generator(device=device).manual_seed(args.seed + 1)}
    meta = common.load_meta(args.data)
    loop_defaults(args, meta)
    if args.item_emb in ("alphafuse", "llminit") and not os.path.exists(args.subspace):
        raise DataError(f"{args.subspace}: file not found (run decompose.py DATA --null_thres 0.25 --out {args.subspace})")
    init, dims, provenance = item_inputs(args, meta)
    model_args = {"item_emb": args.item_emb, "num_items": meta["num_items"], "d": dims.get("hidden_dim", args.hidden_dim),
                  "max_len": meta["max_len"], "num_blocks": args.num_blocks, "num_heads": args.num_heads,
                  "dropout": args.dropout, "timesteps": args.timesteps, "beta_start": args.beta_start,
                  "beta_end": args.beta_end, "schedule": args.schedule, "w": args.w, "p_uncond": args.p_uncond,
                  "sample_steps": args.sample_steps, "d_s": dims.get("d_s", 0), "id_init": args.id_init}
    model_args.update(embedding_args(args, dims))  # unisrec's G, rlmrec's settings, the language input's d_in
    cold = meta.get("cold_items", [])  # prepare.py --cold_items: held out of training
    model = build_model(model_args, init, cold).to(device)
    set_teachers(model, args, meta, init)  # llmesr's self-distillation
    optimizer = torch.optim.AdamW(param_groups(model, meta["num_items"], cold), lr=args.lr,
                                  weight_decay=args.weight_decay, fused=True)
    loss_fn = lambda seq, target, user: model.loss(seq, target, gens["noise"], user, args.alpha)
    loss_fn = with_alignment(loss_fn, model.item_emb, args.align_weight)  # rlmrec's L_info
    fit(args, model, model_args, optimizer, loss_fn, gens, "dreamrec", {**vars(args), "device": device, **provenance})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("data", help="prepared dataset folder DATA (prepare.py)")
    p.add_argument("--out", required=True, help="run folder RUN for ckpt.pt, last.pt, log.jsonl, metrics.json")
    p.add_argument("--subspace", default=None, help="decompose.py output with d = d_l (default DATA/subspace_dreamrec.pt)")
    p.add_argument("--item_emb", choices=["alphafuse", "id", "llminit", "morec", "whitenrec", "unisrec", "rlmrec", "idreamrec", "llmesr"], default="alphafuse", help="item embedding: AlphaFuse or a baseline")
    add_language_args(p)
    add_align_args(p)
    add_distill_args(p)
    p.add_argument("--id_init", choices=["normal", "zeros"], default="normal", help="init of the ID vectors")
    p.add_argument("--hidden_dim", type=int, default=128, help="d for id, morec, whitenrec, unisrec, rlmrec, and of each of llmesr's two views (D = 2d) (alphafuse, llminit: d = d_l of --subspace; idreamrec: of lang_emb.npy)")
    # diffusion
    p.add_argument("--timesteps", type=int, default=2000, help="T, diffusion steps")
    p.add_argument("--beta_start", type=float, default=1e-4, help="beta_1 of the linear schedule")
    p.add_argument("--beta_end", type=float, default=0.02, help="beta_T of the linear schedule")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="beta schedule")
    p.add_argument("--w", type=float, default=5.0, help="w, classifier-free guidance strength")
    p.add_argument("--p_uncond", type=float, default=0.1, help="probability that c is replaced by the null vector")
    p.add_argument("--sample_steps", type=int, default=20, help="DDIM steps (T / stride; official stride 100)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    add_loop_args(p)
    args = p.parse_args(argv)
    args.subspace = args.subspace or os.path.join(args.data, "subspace_dreamrec.pt")
    check_loop_args(p, args, {"timesteps": "[1, inf)", "beta_start": "(0, 1)", "beta_end": f"[{args.beta_start}, 1)",
                              "sample_steps": f"[1, {args.timesteps}]", "w": "[0, 1e37)", "p_uncond": "[0, 1]"})
    try:
        run(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        interrupted(args)


if __name__ == "__main__":
    main()
