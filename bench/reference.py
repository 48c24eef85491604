"""
The SASRec step and evaluation written the obvious way, for the exactness tests and the speed
benchmark: every position through every block, candidates gathered as (B, 1+K, d) and normalised,
einsum logits, the full (B, N+1) score matrix and one int64 count per row for the rank; a plain
(non-fused) Adam. These functions read the parameters of a train_discriminative.SASRec, so the
two implementations can be compared on the same weights. And UniSRec's and LLM-ESR's items as
their equations read, for bench/bench_baselines.py.
"""

import torch
import torch.nn.functional as F

from model import metrics_at


def user_state(model, seq):  # (B, L) -> (B, d): all positions computed, the last one read
    return model.encoder(model.item_emb(seq), seq, all_positions=True)[:, -1]


def loss(model, seq, target, neg):
    """InfoNCE of the target against the negatives neg (B, K), cosine logits over temperature."""
    u = F.normalize(user_state(model, seq), dim=-1)  # (B, d)
    e = F.normalize(model.item_emb(torch.cat([target[:, None], neg], 1)), dim=-1)  # (B, 1+K, d)
    logits = torch.einsum("bd,bmd->bm", u, e) / model.temperature
    logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(neg == target[:, None], float("-inf"))], 1)
    return F.cross_entropy(logits, torch.zeros_like(target))


@torch.no_grad()
def metrics(model, seq, target, ks=(10, 20), batch_size=1024):
    """Full ranking: every score computed, every rank counted."""
    table = F.normalize(model.item_emb(torch.arange(model.num_items + 1)), dim=-1)  # (N+1, d)
    out = []
    for i in range(0, len(target), batch_size):
        u = F.normalize(user_state(model, seq[i:i + batch_size]), dim=-1)
        scores = u @ table.T / model.temperature  # (B, N+1)
        t = target[i:i + batch_size]
        s_target = scores.gather(1, t[:, None])
        out.append(metrics_at((scores[:, 1:] >= s_target).sum(1), ks))
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def unisrec_items(emb, x):
    """UniSRec's items (embeddings.MoEAdaptorEmbedding) as eqs. 2-3 read: every expert's
    (x - b_k) W_k in the (..., G, d) experts, then the gate's weighted sum by multiply-and-sum."""
    d_l, G, d = emb.W.shape
    experts = (emb.drop(x) @ emb.W.view(d_l, G * d)).unflatten(-1, (G, d)) - torch.einsum("gl,lgd->gd", emb.b, emb.W)
    return (emb.gate(x)[..., None] * experts).sum(-2)


def llmesr_semantic(emb, x):
    """LLM-ESR's semantic view (embeddings.DualViewEmbedding) as its two layers read: W_2 (W_1 x + b_1) + b_2."""
    return emb.adapter(x)
