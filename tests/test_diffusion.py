"""Tests of train_diffusion.py (DreamRec): the noise schedules and q_sample, the DDIM timesteps and
update, classifier-free guidance, seeded sampling, the unconditional training condition; then
end to end on a tiny generated dataset (60 users, 40 items, 24-d language embeddings whose last 12
directions have tiny variance, so decompose.py --null_thres 0.25 selects exactly those): both item
embeddings train, the checkpoint reloads and reproduces its metrics, --resume continues exactly,
bad input fails with one clean line.

    cd /work/main && python -m pytest -q tests/test_diffusion.py
"""

import math
import os

import numpy as np
import pytest
import torch

import common
import evaluate
import train_diffusion
import training
from conftest import assert_clean_error, prepare_embedded_toy, read_json, read_log, run_script
from embeddings import load_subspace

torch.set_num_threads(1)

SMALL = ["--hidden_dim", "16", "--batch_size", "64", "--timesteps", "50", "--sample_steps", "5",
         "--lr", "1e-3", "--device", "cpu"]


def make_model(T=100, sample_steps=5, w=2.0, p_uncond=0.1, schedule="linear", d=8, num_items=20, seed=0):
    """A tiny DreamRec with an ID table (d = 8), random weights, no dropout."""
    torch.manual_seed(seed)
    return train_diffusion.DreamRec(item_emb="id", num_items=num_items, d=d, max_len=5, num_blocks=1, num_heads=1,
                                    dropout=0.0, timesteps=T, beta_start=1e-4, beta_end=0.02, schedule=schedule,
                                    w=w, p_uncond=p_uncond, sample_steps=sample_steps)


def random_seq(B=6, L=5, num_items=20, seed=0):
    """(B, L) left-padded histories: row b has b % L padding positions."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (B, L), generator=g)
    for b in range(B):
        seq[b, :b % L] = 0
    return seq


# -----------------------------------------------------------------------------
# schedules and the forward process q(x_t | x0)


def test_q_sample_ends():
    """q_sample at t = 0 is x0 within the noise scale sqrt(1 - abar_0) = 0.01; at t = T-1 (T = 1000) it is mostly the noise."""
    model = make_model(T=1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(256, 8, generator=g), torch.randn(256, 8, generator=g)
    abar = model.alphas_cumprod
    x_first = model.q_sample(x0, torch.zeros(256, dtype=torch.long), noise)
    bound = (1 - abar[0].sqrt()) * x0.abs() + (1 - abar[0]).sqrt() * noise.abs() + 1e-6
    assert torch.all((x_first - x0).abs() <= bound)
    assert (x_first - x0).abs().max() < 0.06 and float((1 - abar[0]).sqrt()) == pytest.approx(0.01, rel=1e-3)
    x_last = model.q_sample(x0, torch.full((256,), 999), noise)
    assert float(abar[-1]) < 1e-4
    assert (x_last - noise).abs().max() < 0.05, "x_{T-1} is not mostly noise"
    assert torch.corrcoef(torch.stack([x_last.flatten(), x0.flatten()]))[0, 1].abs() < 0.05


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [10, 50, 1000, 2000])
def test_alphas_cumprod_decreasing_in_unit_interval(schedule, T):
    """abar_t is strictly decreasing and inside (0, 1), in float64 (beta_schedule) and in the model's float32 buffer."""
    betas = train_diffusion.beta_schedule(schedule, T, 1e-4, 0.02)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    for abar in (torch.cumprod(1 - betas, 0), make_model(T=T, schedule=schedule).alphas_cumprod):
        assert abar.shape == (T,)
        assert torch.all(abar > 0) and torch.all(abar < 1), f"{abar.min()} .. {abar.max()}"
        assert torch.all(abar[1:] < abar[:-1]), "abar not strictly decreasing"


def test_linear_betas_are_linspace_float64():
    """The linear schedule is torch.linspace(beta_start, beta_end, T) in float64, exactly."""
    for T, lo, hi in [(2000, 1e-4, 0.02), (7, 1e-3, 0.1)]:
        betas = train_diffusion.beta_schedule("linear", T, lo, hi)
        assert betas.dtype == torch.float64
        assert torch.equal(betas, torch.linspace(lo, hi, T, dtype=torch.float64))


def test_denoiser_is_the_official_one():
    """f(x_t, c, t) = Linear(3d -> d) of [x_t, c, step(t)] with step(t) = Linear(d -> d) GELU
    Linear(256 -> d) of the 256-d sinusoid [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/127): the
    official FinalLayer and TimestepEmbedder, written out with the model's weights."""
    model = make_model(d=8)
    x_t, c, t = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 999, 1999])
    w = torch.exp(torch.arange(128) * -(math.log(10000) / 127))  # (128,)
    sinusoid = torch.cat([torch.sin(t[:, None] * w), torch.cos(t[:, None] * w)], dim=1)  # (4, 256)
    lin1, lin2 = model.step_mlp[0], model.step_mlp[2]
    step = lin2(torch.nn.functional.gelu(lin1(sinusoid)))
    with torch.no_grad():
        want = model.denoiser(torch.cat([x_t, c, step], dim=1))
        torch.testing.assert_close(model.predict_x0(x_t, c, t), want, rtol=1e-5, atol=1e-5)
    assert lin1.in_features == 256 and lin1.out_features == lin2.in_features == lin2.out_features == 8


# -----------------------------------------------------------------------------
# DDIM timesteps and update


def test_sample_timesteps():
    """DDIM timesteps: sample_steps ints in [0, T-1], strictly decreasing, from T-1 (never T) to 0 (one step: T-1 only)."""
    model = make_model()
    combos = [(T, S) for T in range(1, 41) for S in range(1, T + 1)]
    for T, S in combos + [(2000, 20), (2000, 1), (2000, 2), (2000, 1999), (2000, 2000), (1000, 7), (1001, 10)]:
        model.T, model.sample_steps = T, S  # what the constructor sets from timesteps, sample_steps
        steps = model.sample_timesteps()
        where = f"T = {T}, sample_steps = {S}: {steps if S < 50 else '...'}"
        assert len(steps) == S and all(isinstance(t, int) for t in steps), where
        assert steps[0] == T - 1 and all(0 <= t <= T - 1 for t in steps), where
        assert all(a > b for a, b in zip(steps, steps[1:])), where
        assert S == 1 or steps[-1] == 0, where


# -----------------------------------------------------------------------------
# classifier-free guidance


def test_w_zero_is_the_conditional_prediction():
    """With w = 0, guided_x0(x_t, c, t) equals predict_x0(x_t, c, t) exactly."""
    model = make_model(w=0.0).eval()
    g = torch.Generator().manual_seed(1)
    x_t, c, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randint(0, 100, (6,), generator=g)
    with torch.no_grad():
        assert torch.equal(model.guided_x0(x_t, c, t), model.predict_x0(x_t, c, t))


def toy_denoiser(x_t, c, t):
    """A known f(x_t, c, t), nonlinear in c, so that guidance is visible."""
    return 0.5 * x_t + torch.tanh(3 * c) + 0.01 * t[:, None].float()


def test_guidance_formula_on_toy_denoiser():
    """guided_x0 = (1 + w) f(x_t, c, t) - w f(x_t, null, t), with null the model's learned null vector."""
    w = 2.5
    model = make_model(w=w)
    model.predict_x0 = toy_denoiser
    g = torch.Generator().manual_seed(2)
    x_t, c, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randint(0, 100, (6,), generator=g)
    null = model.null_c.detach().expand(6, 8)
    want = (1 + w) * toy_denoiser(x_t, c, t) - w * toy_denoiser(x_t, null, t)
    torch.testing.assert_close(model.guided_x0(x_t, c, t), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want, toy_denoiser(x_t, c, t)), "the toy case does not show guidance"


def test_guided_x0_fn_equals_the_guidance_formula():
    """The per-step form of guidance that DDIM uses (the condition's terms computed once) gives
    guided_x0, i.e. (1 + w) f(x_t, c, t) - w f(x_t, null, t), at every t."""
    model = make_model(w=5.0)
    g = torch.Generator().manual_seed(2)
    c, x_t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    with torch.no_grad():
        x0_fn = model.guided_x0_fn(c)
        for t in (0, 7, model.T - 1):
            want = model.guided_x0(x_t, c, torch.full((6,), t))
            torch.testing.assert_close(x0_fn(x_t, torch.tensor([t])), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,S", [(100, 5), (50, 50), (2000, 20), (30, 1)])
def test_ddim_with_perfect_denoiser(T, S):
    """DDIM (eta = 0) with a denoiser that always predicts x0 returns x0 exactly, visiting x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for one eps."""
    model = make_model(T=T, sample_steps=S, w=5.0)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(-16, 17, (6, 8), generator=g).float() / 8  # dyadic: (1+w) x0 - w x0 is exact
    calls = []

    def perfect(x_t, t):
        calls.append((x_t.clone(), t.clone()))
        return x0.clone()

    model.guided_x0_fn = lambda c: perfect
    c = torch.randn(6, 8, generator=g)
    out = model.ddim_sample(c, torch.Generator().manual_seed(4))
    assert torch.equal(out, x0)
    assert [int(t[0]) for _, t in calls] == model.sample_timesteps()
    abar = model.alphas_cumprod.double()
    x_T = calls[0][0].double()
    eps = (x_T - abar[T - 1].sqrt() * x0) / (1 - abar[T - 1]).sqrt()
    for x_t, t in calls:
        a = abar[int(t[0])]
        torch.testing.assert_close(x_t.double(), a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-5)


def test_scorer_is_seeded():
    """scorer(seed): same seed, same scores (N+1 columns, also for a batch of one); another seed, other scores."""
    model = make_model().eval()
    seq = random_seq()
    def scores(seed, seq):
        query, table = model.scorer(seed)
        return query(seq) @ table.T

    with torch.no_grad():
        a, b, other = scores(7, seq), scores(7, seq), scores(8, seq)
    assert a.shape == (6, 21)
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)
    with torch.no_grad():
        assert scores(7, seq[:1]).shape == (1, 21), "a batch of one breaks"


def test_p_uncond_one_always_uses_null_condition():
    """p_uncond = 1: the condition is always the null vector (loss independent of seq, no encoder gradient); p_uncond = 0: not."""
    seq_a, seq_b = random_seq(seed=0), random_seq(seed=1)
    target = torch.arange(1, 7)
    for p_uncond, depends in ((1.0, False), (0.0, True)):
        model = make_model(p_uncond=p_uncond)
        loss_a = model.loss(seq_a, target, torch.Generator().manual_seed(5))
        loss_b = model.loss(seq_b, target, torch.Generator().manual_seed(5))
        assert (loss_a.item() != loss_b.item()) == depends, (p_uncond, loss_a.item(), loss_b.item())
        loss_a.backward()
        encoder_grad = sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None)
        assert (encoder_grad > 0) == depends, (p_uncond, encoder_grad)
        assert (model.null_c.grad is not None and model.null_c.grad.abs().sum() > 0) == (not depends)


def test_whole_sequences_equal_windows_and_keep_one_shape():
    """Users of 2 to L + 1 items, so whole sequences are left-padded: with a denoiser that reads only
    c (W_x = W_t = 0), p_uncond = 0 and no position embeddings, the loss no longer depends on the
    draws, and the whole-sequence loss and its gradients equal the windows' (every real position
    one x0, padding none). The denoiser sees B L rows whatever the padding: varying row counts made
    oneDNN cache a primitive per batch."""
    N, L = 20, 5
    g = torch.Generator().manual_seed(3)
    seqs, targets, users = [], [], []
    for u, n in enumerate([2, 3, L + 1, 4, L + 1, 2]):  # windows as prepare.py writes them, in time order
        items = torch.randperm(N, generator=g)[:n] + 1
        for t in range(1, n):
            seqs.append(torch.cat([torch.zeros(L - t, dtype=torch.long), items[:t]]))
            targets.append(items[t])
            users.append(u)
    windows = {"seq": torch.stack(seqs), "target": torch.stack(targets), "user": torch.tensor(users)}
    sequences = training.whole_sequences(windows)
    assert (sequences["seq"] == 0).any() and int((sequences["target"] > 0).sum()) == len(seqs)
    model = make_model(p_uncond=0.0)
    d = model.null_c.shape[0]
    with torch.no_grad():
        model.encoder.pos.weight.zero_()
        W_x, _, W_t = model.denoiser.weight.split(d, dim=1)
        W_x.zero_(), W_t.zero_()
    rows = []
    model.denoiser.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    runs = []
    for batch, seed in ((windows, 5), (sequences, 6)):
        model.zero_grad()
        loss = model.loss(batch["seq"], batch["target"], torch.Generator().manual_seed(seed))
        loss.backward()
        # not compared: the positions' gradient (a window's items sit at other slots) and W_x's and
        # W_t's, which read x_t and t, so the draws
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if name != "encoder.pos.weight"}
        grads["denoiser.weight"] = grads["denoiser.weight"][:, d:2 * d]  # W_c
        runs.append((loss.detach(), grads))
    assert rows == [len(seqs), len(sequences["seq"]) * L]
    (loss_w, by_windows), (loss_s, by_sequences) = runs
    torch.testing.assert_close(loss_s, loss_w, rtol=1e-5, atol=1e-7)
    assert by_sequences.keys() == by_windows.keys() and "item_emb.weight" in by_windows
    for name in by_windows:
        torch.testing.assert_close(by_sequences[name], by_windows[name], rtol=1e-4, atol=1e-6, msg=name)


# -----------------------------------------------------------------------------
# end to end: train_diffusion.py and evaluate.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA prepared from generated RecBole atomic files, with lang_emb.npy (N, 24) whose last 12
    coordinates have standard deviation 1e-3 (eigenvalues ~0.002 after --scale 40, the first 12 ~1600),
    and subspace_dreamrec.pt from decompose.py --null_thres 0.25 (d = d_l = 24, d_s = d_n = 12):
    conftest.prepare_embedded_toy."""
    out = prepare_embedded_toy(tmp_path_factory.mktemp("diffusion"))
    n = common.load_meta(out)["num_items"]
    sub = load_subspace(os.path.join(out, "subspace_dreamrec.pt"), n)
    assert (sub["d_s"], sub["d_n"], sub["lang_emb"].shape[1]) == (12, 12, 24)
    return out


def train(data, out, *flags, epochs=1):
    """train_diffusion.main in-process; returns RUN as a str."""
    train_diffusion.main([data, "--out", str(out), *SMALL, "--epochs", str(epochs), *map(str, flags)])
    return str(out)


@pytest.mark.parametrize("item_emb,d", [("alphafuse", 24), ("id", 16), ("unisrec", 16)])
def test_smoke_and_reload(data, tmp_path, item_emb, d):
    """One epoch writes every file; ckpt.pt loads weights_only, backbone dreamrec, frozen E_lang (unisrec:
    lang_emb.npy times the default --lang_scale 40), evaluate.py reproduces metrics.json."""
    run = train(data, tmp_path / "run", "--item_emb", item_emb)
    for name in ("ckpt.pt", "last.pt", "log.jsonl", "metrics.json"):
        assert os.path.isfile(os.path.join(run, name)), f"{name} missing"
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["loss"])
    metrics = read_json(os.path.join(run, "metrics.json"))
    assert all(v is not None and 0.0 <= v <= 1.0 for v in metrics["test"]["all"].values()), metrics
    ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    assert ck["backbone"] == "dreamrec"
    assert ck["model_args"]["item_emb"] == item_emb and ck["model_args"]["d"] == d
    assert ck["model_args"]["timesteps"] == 50 and ck["model_args"]["sample_steps"] == 5
    train_diffusion.build_model(ck["model_args"]).load_state_dict(ck["model"])  # strict
    if item_emb == "alphafuse":  # the language coordinates stayed frozen
        sub = load_subspace(os.path.join(data, "subspace_dreamrec.pt"))
        assert torch.equal(ck["model"]["item_emb.lang"], sub["lang_emb"].float())
    if item_emb == "unisrec":
        assert torch.equal(ck["model"]["item_emb.features"][1:], 40 * torch.from_numpy(np.load(os.path.join(data, "lang_emb.npy"))))
    out = str(tmp_path / "again.json")
    evaluate.main([os.path.join(run, "ckpt.pt"), "--out", out, "--device", "cpu"])
    assert read_json(out) == metrics
    assert not [f for f in os.listdir(run) if ".tmp" in f], "temporary files left behind"


def test_resume_continues_exactly(data, tmp_path):
    """1 epoch then --resume to 2 logs the same losses and validation metrics, and test metrics, as a straight 2-epoch run."""
    resumed = train(data, tmp_path / "resumed", epochs=1)
    train(data, resumed, "--resume", epochs=2)
    straight = train(data, tmp_path / "straight", epochs=2)
    r, s = read_log(resumed), read_log(straight)
    assert [x["epoch"] for x in r] == [1, 2]
    assert [x["loss"] for x in r] == [x["loss"] for x in s]
    assert [x["valid"] for x in r] == [x["valid"] for x in s]
    assert read_json(os.path.join(resumed, "metrics.json")) == read_json(os.path.join(straight, "metrics.json"))


# -----------------------------------------------------------------------------
# bad input: one 'error:' line on stderr, no traceback, non-zero exit, no output


def test_missing_subspace(data, tmp_path):
    """--item_emb alphafuse with a subspace file that does not exist: one clean line, no run folder."""
    missing = str(tmp_path / "none.pt")
    run = tmp_path / "run"
    proc = run_script("train_diffusion.py", data, "--out", run, "--subspace", missing, "--epochs", "1", "--device", "cpu")
    assert_clean_error(proc, missing)
    assert not run.exists()


@pytest.mark.parametrize("steps", ["0", "51"])
def test_sample_steps_out_of_range(data, tmp_path, steps):
    """--sample_steps 0, or more than T = 50, is rejected before anything is written."""
    run = tmp_path / "run"
    proc = run_script("train_diffusion.py", data, "--out", run, "--timesteps", "50", "--sample_steps", steps,
                      "--epochs", "1", "--device", "cpu")
    assert_clean_error(proc, "--sample_steps", argparse_ok=True)
    assert not run.exists()
