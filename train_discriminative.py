"""
Train SASRec with AlphaFuse item embeddings, or with one of the baselines that differ only in the
item embedding, then evaluate the best checkpoint once on test.

    python decompose.py data/toys                       # -> data/toys/subspace.pt (d = 128, d_n = 64)
    python train_discriminative.py data/toys --out runs/toys_alphafuse
    python train_discriminative.py data/toys --out runs/toys_id --item_emb id

--item_emb   alphafuse  frozen standardized language coordinates + trainable ID vectors in the
                        null space (coordinates d_s..d) of subspace.pt
             id         a trainable table (N+1, d), SASRec
             llminit    a trainable table initialised from subspace.pt's language coordinates
             morec      frozen language embeddings (lang_emb.npy) x --lang_scale -> MLP adapter
             whitenrec  frozen whitened language embeddings (all d_l directions) -> MLP adapter
             unisrec    frozen language embeddings x --lang_scale -> UniSRec's MoE adaptor of --experts
                        parametric whitening layers (embeddings.MoEAdaptorEmbedding)
             rlmrec     a trainable table, as id, aligned to the frozen language embeddings x --lang_scale by
                        RLMRec's --align loss times --align_weight (embeddings.RLMRecEmbedding)
             llmesr     LLM-ESR: a table initialised by PCA of the language embeddings x --lang_scale beside
                        the frozen ones through an adapter (2d items), the views fused by
                        cross-attention and concatenation, one shared encoder, plus --alpha times a
                        self-distillation towards --sim_users similar users (DualViewEmbedding)
Reads  DATA/{train,valid,test}.npz, DATA/meta.json, and --subspace (alphafuse, llminit) or
       DATA/lang_emb.npy (morec, whitenrec, unisrec, rlmrec, llmesr).
Writes RUN/ckpt.pt (best validation NDCG@20), RUN/last.pt (latest epoch, for --resume),
       RUN/log.jsonl (one line per epoch), RUN/metrics.json (test, best checkpoint).
Prints one line per epoch (loss, validation metrics, seconds, samples/s), a progress line every
--progress_every seconds within an epoch, and the test table.
--train_on windows (default for --split user data): one sample per target, as the official code;
sequences (default for --split loo): each user's last L + 1 training items, every position
predicting the next item (SASRec's paper, LLM-ESR). The loop is training.py's.

NOTE where this differs from the official code: batches are shuffled (--file_order for the
official fixed order); the score function (cosine by default, as InfoNCE trains) is the same in
training and evaluation unless --eval_score dot asks for the official raw dot product; negatives
that hit the target are masked out instead of drawn again (--redraw_negatives for the official
rule); evaluation runs in eval mode without gradients.
Cold items (prepare.py --cold_items) are never touched: negatives are drawn among the warm items
only, ce's softmax leaves them out, and their rows stay as they started: zero ID parts, llminit's
and --train_lang's language rows, llmesr's PCA rows (those tables then take no weight decay, which
would shrink them).
"""

import argparse
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

# -----------------------------------------------------------------------------
# sampled scores, and the model


class SampledScores(torch.autograd.Function):
    """u (P, d) against the table rows idx (P, M) -> (P, M) scores u_p . e_j, or u_p . e_j / |e_j|
    with cosine=True (u is normalised by the caller), j = idx_pm, e_j = table[j].

    The numbers and gradients of the obvious einsum over the gathered (P, M, d) candidates (with
    F.normalize for cosine, for norms above its eps 1e-12), without ever holding those candidates:
    autograd would keep them, meet them again as a (P, M, d) gradient, scatter it with index_put,
    and differentiate the norms of the whole table. Here the forward gathers 64 rows at a time
    (they stay in cache) and the backward is two sparse products with
    S = sum_pm w_pm e_p e_j^T (P, N+1), w = grad (/ |e_j| for cosine): grad_u = S table and
    grad_table = S^T u, minus c_j e_j with c_j = sum_{pm: idx_pm = j} w_pm score_pm / |e_j| for
    cosine (the derivative of 1/|e_j|). 3x faster than autograd's path at amazon-toys' windows,
    10x at ml-1m's whole sequences (P = 12,800 positions a step), before S table became an
    embedding_bag."""

    @staticmethod
    def forward(ctx, u, table, idx, cosine):
        norm = torch.linalg.vector_norm(table, dim=1).clamp_min(1e-12) if cosine else None  # (N+1,)
        scores = u.new_empty(idx.shape)  # (P, M)
        for i in range(0, len(idx), 64):  # 64 rows of candidates (64, M, d) at a time stay in cache
            E = table.index_select(0, idx[i:i + 64].flatten()).view(-1, idx.shape[1], u.shape[1])
            scores[i:i + 64] = torch.linalg.vecdot(E, u[i:i + 64, None, :])
        if cosine:
            scores = scores / norm[idx]
        ctx.save_for_backward(u, table, idx, scores, norm)
        ctx.cosine = cosine
        return scores

    @staticmethod
    def backward(ctx, grad):  # grad (P, M)
        u, table, idx, scores, norm = ctx.saved_tensors
        w = grad / norm[idx] if ctx.cosine else grad  # (P, M)
        # S table: row p is sum_m w_pm e_(idx_pm), a weighted bag of table rows (one fused kernel,
        # 8x faster than a sparse COO product at ml-1m's 11,281 positions)
        grad_u = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")  # (P, d)
        rows = torch.arange(len(idx), device=idx.device).repeat_interleave(idx.shape[1])
        S_t = torch.sparse_coo_tensor(torch.stack([idx.flatten(), rows]), w.flatten(), (len(table), len(idx)),
                                      check_invariants=False)
        grad_table = torch.sparse.mm(S_t, u)  # (N+1, d)
        if ctx.cosine:
            c = torch.zeros_like(norm).index_add_(0, idx.flatten(), (w * scores).flatten()) / norm  # (N+1,)
            grad_table.addcmul_(c[:, None], table, value=-1)
        return grad_u, grad_table, None, None



class SASRec(torch.nn.Module):

    def __init__(self, item_emb, num_items, d, max_len, num_blocks, num_heads, dropout, score,
                 eval_score, temperature, d_in=0, d_s=0, id_init="normal", train_lang=False, id_replace=False, init=None,
                 cold=(), experts=8, align="con", align_temperature=0.2, lang_scale=1.0):
        super().__init__()
        self.num_items, self.score, self.eval_score, self.temperature = num_items, score, eval_score, temperature
        self.item_emb = make_item_embedding(item_emb, num_items, d, d_in, d_s, id_init, train_lang, id_replace, init, cold,
                                            experts, align, align_temperature, lang_scale)
        encoder = DualViewEncoder if item_emb == "llmesr" else SASRecEncoder
        self.encoder = encoder(d, max_len, num_blocks, num_heads, dropout)
        # llmesr's teachers of the self-distillation (similar (U, N), teacher_seq (U, L)), set by
        # run: training only, not in the checkpoint
        self.register_buffer("similar", None, persistent=False)
        self.register_buffer("teacher_seq", None, persistent=False)
        # cold items (training only, not in the checkpoint) are no candidate of any loss: the model
        # never learns of them, so it ranks them as items that arrive after training
        not_warm = torch.zeros(num_items + 1, dtype=torch.bool)
        not_warm[[0, *cold]] = True  # the padding item and the cold ones
        self.register_buffer("cold", torch.tensor(list(cold)) if cold else None, persistent=False)  # (C,)
        self.register_buffer("warm", (~not_warm).nonzero()[:, 0] if cold else None, persistent=False)  # (N - C,)

    def table(self):  # (N+1, d): every item's embedding, differentiable; row 0 (padding) is zero
        emb = self.item_emb
        return emb.weight if isinstance(emb, torch.nn.Embedding) else emb.table()

    def user_state(self, seq, table, all_positions=False):  # (B, L), table() -> (B, d), or (B, L, d)
        # rows of the step's table; index_select's backward is one index_add, faster than F.embedding's
        seq_emb = table.index_select(0, seq.flatten()).view(*seq.shape, -1)  # (B, L, d)
        return self.encoder(seq_emb, seq, all_positions)

    def self_distillation(self, u, user, table):  # u (B, 2d) -> L_sd, model.self_distillation with this table
        return self_distillation(lambda seq: self.user_state(seq, table), u, user, self.similar, self.teacher_seq)

    def logits(self, u, e, score):
        """u (B, d) against every item e (N+1, d) -> (B, N+1); 1/tau is folded into the user states."""
        if score == "cosine":
            u, e = F.normalize(u, dim=-1) / self.temperature, F.normalize(e, dim=-1)
        return u @ e.T

    def sampled_logits(self, u, table, idx, score):
        """u (P, d) against the items idx (P, M) -> (P, M), the numbers of logits() at those items."""
        if score == "cosine":
            return SampledScores.apply(F.normalize(u, dim=-1) / self.temperature, table, idx, True)
        return SampledScores.apply(u, table, idx, False)

    @torch.no_grad()
    def scorer(self, seed=0):
        """The scores of one evaluation as (query, table): query(seq (B, L)) -> (B, d) and the items
        (N+1, d), scores = query @ table.T; the table is computed (and normalised) once, 1/tau goes
        into the queries. SASRec draws no noise: the seed is unused."""
        table = self.table()  # (N+1, d)
        if self.eval_score == "dot":
            return lambda seq: self.user_state(seq, table), table
        return lambda seq: F.normalize(self.user_state(seq, table), dim=-1) / self.temperature, F.normalize(table, dim=-1)

    def loss(self, seq, target, loss, neg_ratio, generator, neg=None, redraw=False, user=None, alpha=0.0):
        """seq (B, L) histories and target (B,) their next items (windows), or target (B, L) the
        next item after every position, 0 after padding (whole sequences: every real position
        is a sample). InfoNCE and BCE draw K uniform negatives per sample unless `neg` gives them;
        a negative that is the target is masked out, or with `redraw` drawn again until it is not
        (the official code's rule). With teachers (llmesr), the samples' users (B,) and alpha > 0,
        plus alpha L_sd on the state of each sample's last position (LLM-ESR: L = L_rank + alpha L_sd)."""
        table = self.table()  # (N+1, d), computed once per step
        if target.dim() == 2:
            real = target > 0  # (B, L)
            states = self.user_state(seq, table, all_positions=True)  # (B, L, d)
            u, target, last = states[real], target[real], states[:, -1]  # (P, d), (P,), (B, d)
        else:
            u = last = self.user_state(seq, table)  # (B, d)
        distill = 0.0  # LLM-ESR's alpha L_sd, where run set the teachers
        if alpha and user is not None and self.similar is not None:
            distill = alpha * self.self_distillation(last, user, table)
        if loss == "ce":  # full softmax over the N items (the warm ones)
            logits = self.logits(u, table, self.score)  # (P, N+1)
            if self.cold is not None:
                logits = logits.index_fill(1, self.cold, float("-inf"))
            return F.cross_entropy(logits[:, 1:], target - 1) + distill
        if neg is None:
            neg = self.draw_items((len(target), neg_ratio), generator, seq.device)
            while redraw and (hit := neg == target[:, None]).any():
                neg[hit] = self.draw_items((int(hit.sum()),), generator, seq.device)
        logits = self.sampled_logits(u, table, torch.cat([target[:, None], neg], 1), self.score)  # (P, 1+K)
        pos, neg_logits = logits[:, 0], logits[:, 1:].masked_fill(neg == target[:, None], float("-inf"))
        if loss == "infonce":  # the positive against K uniform negatives
            return F.cross_entropy(torch.cat([pos[:, None], neg_logits], 1), torch.zeros_like(target)) + distill
        hit = neg_logits.isfinite()  # bce: each negative that is not the target
        neg_term = (F.softplus(neg_logits) * hit).sum(1) / hit.sum(1).clamp(min=1)
        return (F.softplus(-pos) + neg_term).mean() + distill

    def draw_items(self, shape, generator, device):
        """Uniform negatives (shape) among the items 1..N, or among the warm items only when the
        data has cold ones."""
        if self.warm is None:
            return torch.randint(1, self.num_items + 1, shape, device=device, generator=generator)
        return self.warm[torch.randint(0, len(self.warm), shape, device=device, generator=generator)]


def build_model(model_args, init=None, cold=()):
    return SASRec(**model_args, init=init, cold=cold)


def model_args_of(args, meta, dims):
    """build_model's model_args from the command line, meta.json and item_inputs' dims."""
    model_args = {"item_emb": args.item_emb, "num_items": meta["num_items"], "d": dims.get("hidden_dim", args.hidden_dim),
                  "max_len": meta["max_len"], "num_blocks": args.num_blocks, "num_heads": args.num_heads,
                  "dropout": args.dropout, "score": args.score, "eval_score": args.eval_score or args.score,
                  "temperature": args.temperature, "d_in": dims.get("d_in", 0), "d_s": dims.get("d_s", 0),
                  "id_init": args.id_init, "train_lang": args.train_lang, "id_replace": args.id_replace}
    model_args.update(embedding_args(args, dims))  # unisrec's G, rlmrec's settings, the language input's d_in
    return model_args


def run(args):
    device = args.device  # checked and resolved by check_loop_args
    gens = {"perm": seed_everything(args.seed),
            "negatives": torch.Generator(device=device).manual_seed(args.seed + 1)}
    meta = common.load_meta(args.data)
    loop_defaults(args, meta)
    init, dims, provenance = item_inputs(args, meta)
    model_args = model_args_of(args, meta, dims)
    cold = meta.get("cold_items", [])  # prepare.py --cold_items: held out of training
    model = build_model(model_args, init, cold).to(device)
    set_teachers(model, args, meta, init)  # llmesr's self-distillation
    # fused: one kernel over all parameters (CPU and CUDA), 10x faster than the loop over them on CPU
    optimizer = torch.optim.Adam(param_groups(model, meta["num_items"], cold), lr=args.lr,
                                 weight_decay=args.weight_decay, fused=True)
    loss_fn = lambda seq, target, user: model.loss(seq, target, args.loss, args.neg_ratio, gens["negatives"],
                                                   redraw=args.redraw_negatives, user=user, alpha=args.alpha)
    loss_fn = with_alignment(loss_fn, model.item_emb, args.align_weight)  # rlmrec's L_info
    fit(args, model, model_args, optimizer, loss_fn, gens, "sasrec", {**vars(args), "device": device, **provenance})


def parse_args(argv=None):
    """The command line, checked (parser.error on a bad flag), with the defaults that depend on other flags filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("data", help="prepared dataset folder DATA (prepare.py)")
    p.add_argument("--out", required=True, help="run folder RUN for ckpt.pt, last.pt, log.jsonl, metrics.json")
    p.add_argument("--subspace", default=None, help="decompose.py output (default DATA/subspace.pt): E_lang, d_s, d_n")
    # item embedding and loss
    p.add_argument("--item_emb", choices=["alphafuse", "id", "llminit", "morec", "whitenrec", "unisrec", "rlmrec", "llmesr"], default="alphafuse", help="item embedding: AlphaFuse or a baseline")
    add_language_args(p)
    add_align_args(p)
    add_distill_args(p)
    p.add_argument("--id_init", choices=["normal", "zeros"], default="normal", help="init of the ID vectors in the null space (alphafuse)")
    p.add_argument("--train_lang", action="store_true", help="train the language coordinates too (ablation 'w/o Frozen')")
    p.add_argument("--id_replace", action="store_true", help="ID vectors replace the null coordinates instead of adding to them")
    p.add_argument("--loss", choices=["infonce", "ce", "bce"], default="infonce", help="InfoNCE with K negatives, full softmax CE, or BCE")
    p.add_argument("--neg_ratio", type=int, default=64, help="K, uniform negatives per sample (infonce, bce)")
    p.add_argument("--redraw_negatives", action="store_true", help="draw a negative that is the target again until it is not, as the official code (default: mask it out)")
    p.add_argument("--temperature", type=float, default=0.07, help="tau of the cosine logits")
    p.add_argument("--score", choices=["cosine", "dot"], default="cosine", help="similarity of user state and item in training")
    p.add_argument("--eval_score", choices=["cosine", "dot"], default=None, help="similarity for ranking (default: --score; official code: dot)")
    p.add_argument("--hidden_dim", type=int, default=128, help="d for id, morec, whitenrec, unisrec, rlmrec, and of each of llmesr's two views (alphafuse and llminit take d from --subspace)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight_decay", type=float, default=1e-6, help="Adam weight decay")
    add_loop_args(p)
    args = p.parse_args(argv)
    args.subspace = args.subspace or os.path.join(args.data, "subspace.pt")
    check_loop_args(p, args, {"temperature": "(0, 1e37)", **({"neg_ratio": "[1, inf)"} if args.loss != "ce" else {})})
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        interrupted(args)


if __name__ == "__main__":
    main()
