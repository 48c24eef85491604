"""bench/differences.py, the measurements of our deliberate differences from the official code:
the official DDIM steps (denoiser at t = T, T - s, ..., 0, noise levels of t - 1) and the count of
real rows the official query mask zeroes.

    cd /work/main && python -m pytest -q tests/test_differences.py
"""

import os
import sys

import torch

from conftest import REPO
from test_diffusion import make_model, random_seq
import train_discriminative

sys.path.insert(0, os.path.join(REPO, "bench"))
import differences  # noqa: E402

torch.set_num_threads(1)


def test_official_ddim_steps_and_levels():
    """With a denoiser that always predicts x0 the official steps return x0 too; the denoiser sees
    t = 100, 80, ..., 0 (one step more than ours) and x_t sits at the noise level of t - 1 (of 0 at
    t = 0), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for the one eps of x_T."""
    model = make_model(T=100, sample_steps=5, w=5.0)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(-16, 17, (6, 8), generator=g).float() / 8
    calls = []
    model.guided_x0_fn = lambda c: lambda x_t, t: calls.append((x_t.clone(), int(t[0]))) or x0.clone()
    out = differences.official_ddim_sample(model, torch.randn(6, 8, generator=g), torch.Generator().manual_seed(4))
    assert torch.equal(out, x0)
    assert [t for _, t in calls] == [100, 80, 60, 40, 20, 0]
    abar = model.alphas_cumprod.double()
    eps = (calls[0][0].double() - abar[99].sqrt() * x0) / (1 - abar[99]).sqrt()
    for x_t, t in calls:
        a = abar[max(t - 1, 0)]
        torch.testing.assert_close(x_t.double(), a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-5)


def test_query_mask_counts_real_rows_whose_layernorm_sums_to_zero():
    """A query LayerNorm that outputs zeros makes every real row count (the last position of each of
    2 blocks, or every real position); one whose output sums to 8 makes none."""
    torch.manual_seed(0)
    model = train_discriminative.build_model(dict(item_emb="id", num_items=20, d=8, max_len=5, num_blocks=2,
                                                  num_heads=1, dropout=0.0, score="cosine", eval_score="cosine",
                                                  temperature=0.07)).eval()
    seq = random_seq(B=6, L=5, num_items=20)
    real = int((seq > 0).sum())
    for block in model.encoder.blocks:
        torch.nn.init.zeros_(block.ln_q.weight)
        torch.nn.init.zeros_(block.ln_q.bias)
    assert differences.query_mask_rows(model, seq, all_positions=False) == (2 * 6, 2 * 6)
    assert differences.query_mask_rows(model, seq, all_positions=True) == (2 * real, 2 * real)
    for block in model.encoder.blocks:
        torch.nn.init.ones_(block.ln_q.bias)
    assert differences.query_mask_rows(model, seq, all_positions=True) == (0, 2 * real)
