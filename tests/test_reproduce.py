"""reproduce.sh end to end on a tiny generated dataset (60 users, 40 items, the real local embedding
server), and report.py's tables: every method and ablation runs for 2 seeds, the table cells are
the mean and sample standard deviation of the runs' metrics.json, a rerun skips finished runs,
an interrupted run resumes, a failing run fails the script, bad input fails with one clean line,
DreamRec's rate defaults per dataset.

    cd /work/main && python -m pytest -q tests/test_reproduce.py
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import report
from conftest import default_sigint, REPO, assert_clean_error, prepare_toy, read_json, read_log, run_command, run_script

MAIN_ROWS = ["Popularity", "SASRec (ID)", "LLMInit", "MoRec", "WhitenRec", "AlphaFuse (SASRec)",
             "DreamRec (ID)", "AlphaFuse (DreamRec)"]
RUNS = ["sasrec_alphafuse", "sasrec_id", "sasrec_llminit", "sasrec_morec", "sasrec_whitenrec",
        "dreamrec_alphafuse", "dreamrec_id", "ablation_nostand", "ablation_noclip", "ablation_nofrozen",
        "official_fileorder", "official_redraw", "official_dreamrec_zero"]
DREAMREC_RUNS = ("dreamrec", "official_dreamrec")  # name prefixes of the DreamRec runs
# The settings in reproduce() bound the work: about 30 commands that each start Python, most of
# them torch; 3 minutes on 2 cores beside another CPU-heavy process. A run still going after an
# hour hangs (the limit is no measure of the machine's speed).
HANG_TIMEOUT = 3600


def reproduce(root, **settings):
    """bash reproduce.sh with everything under `root`; returns the CompletedProcess."""
    env = dict(os.environ, PY=sys.executable, SHARED=str(root / "shared"), DATA_ROOT=str(root / "data"),
               OUT=str(root / "runs"), DOCS=str(root / "docs"), DATASETS="toy", ABLATE="toy", SEEDS="0 1",
               EPOCHS="2", DIFF_EPOCHS="1", DIFF_LR="1e-3", JOBS="2", RESULTS=str(root / "results"),
               SASREC="alphafuse id llminit morec whitenrec", DREAMREC="alphafuse id")  # the other baselines: their own tests
    env.update(settings)
    return run_command(["bash", os.path.join(REPO, "reproduce.sh")], env=env, timeout=HANG_TIMEOUT)


def shared_toy(root, names=("toy",), items=40):
    """prepare_toy's generated sources as SHARED/NAME for each of `names`, and no DATA: reproduce.sh
    prepares it again."""
    prepare_toy(root, items=items)
    for name in names:
        shutil.copytree(root / "src", root / "shared" / name)
    shutil.rmtree(root / "data")


def rows(text):
    """Markdown tables of report.py's output -> {title: {label: [cells]}}, the title being the
    heading above the table."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables.setdefault(title, {})[cells[0]] = cells[1:]
    return tables


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """One reproduce.sh run over the toy dataset, 2 seeds, 2 epochs (DreamRec 1)."""
    root = tmp_path_factory.mktemp("repro")
    shared_toy(root)
    proc = reproduce(root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_every_run_finishes_with_its_schedule(repro):
    root, _ = repro
    runs = root / "runs" / "toy"
    assert sorted(os.listdir(runs)) == sorted(["popularity"] + [f"{r}_s{s}" for r in RUNS for s in (0, 1)])
    for name in os.listdir(runs):
        assert os.path.isfile(runs / name / "metrics.json"), name
        if name != "popularity":
            epochs = 1 if name.startswith(DREAMREC_RUNS) else 2
            assert [r["epoch"] for r in read_log(runs / name)] == list(range(1, epochs + 1)), name
    for name in ("subspace.pt", "subspace_dreamrec.pt", "subspace_nostand.pt", "subspace_noclip.pt",
                 "subspace_dreamrec_zero.pt"):
        assert os.path.isfile(root / "data" / "toy" / name), name


def test_results_keeps_the_small_files_of_every_finished_run(repro):
    """RESULTS gets each finished run's log.jsonl and metrics.json, byte for byte, and nothing else,
    and report.py builds the same tables from it as from the runs."""
    root, proc = repro
    runs, results = root / "runs" / "toy", root / "results" / "toy"
    assert sorted(os.listdir(results)) == sorted(os.listdir(runs))
    for name in os.listdir(runs):
        files = ["log.jsonl", "metrics.json", "metrics_masked.json"]  # and ranked by the dot product, SASRec
        files = files[1:] if name == "popularity" else files if name.startswith(DREAMREC_RUNS) else files + ["metrics_dot.json"]
        assert sorted(os.listdir(results / name)) == sorted(files), name
        for f in files:
            assert (results / name / f).read_bytes() == (runs / name / f).read_bytes(), (name, f)
    again = run_script("report.py", root / "results")
    assert again.returncode == 0, again.stderr
    assert (root / "docs" / "results.md").read_text() in again.stdout


def test_ablations_get_their_subspaces(repro):
    """w/o Clip keeps all d_l = 384 directions with the same d_n = 64; w/o Frozen trains the
    language coordinates; w/o Stand reads the unstandardized subspace; the official_* runs have
    their one official setting: DreamRec's the subspace whose zero directions are standardized."""
    import torch
    root, _ = repro
    runs = root / "runs" / "toy"

    def config(name):
        return torch.load(runs / name / "ckpt.pt", weights_only=True)

    noclip = config("ablation_noclip_s0")
    assert noclip["model_args"]["d"] == 384 and noclip["model_args"]["d_s"] == 320
    assert config("sasrec_alphafuse_s0")["model_args"]["d"] == 128
    assert config("ablation_nofrozen_s0")["model_args"]["train_lang"] is True
    assert config("ablation_nostand_s0")["config"]["subspace"].endswith("subspace_nostand.pt")
    settings = {n: (config(n)["config"]["file_order"], config(n)["config"]["redraw_negatives"])
                for n in ("sasrec_alphafuse_s0", "official_fileorder_s0", "official_redraw_s0")}
    assert settings == {"sasrec_alphafuse_s0": (False, False), "official_fileorder_s0": (True, False),
                        "official_redraw_s0": (False, True)}
    zero = config("official_dreamrec_zero_s0")
    assert zero["config"]["subspace"].endswith("subspace_dreamrec_zero.pt")
    assert zero["model_args"] == config("dreamrec_alphafuse_s0")["model_args"]
    ours, official = (torch.load(root / "data" / "toy" / f, weights_only=True)
                      for f in ("subspace_dreamrec.pt", "subspace_dreamrec_zero.pt"))
    s = ours["eigenvalues"][:ours["lang_emb"].shape[1]]
    zero = ~(s > s[0] * 1e-12)  # the 40 toy items span 39 of the 384 directions
    assert zero.sum() == 384 - 39 and torch.equal(ours["lang_emb"][:, ~zero], official["lang_emb"][:, ~zero])
    assert not ours["lang_emb"][:, zero].any()
    torch.testing.assert_close(official["lang_emb"][1:, zero].double().var(dim=0), torch.ones(345, dtype=torch.float64))


def test_table_cells_are_mean_and_std_over_seeds(repro):
    """Each row: mean ± sample std over the seeds of each protocol's file, best and last epochs from
    the logs; a method whose best epoch is the last for some seed is in the 'not converged' table."""
    root, proc = repro
    runs = root / "runs" / "toy"
    text = (root / "docs" / "results.md").read_text()
    assert text in proc.stdout
    tables = rows(text)
    late = "not converged (a seed's best epoch is its last epoch)"
    ablated, official = "toy, ablations of AlphaFuse (SASRec)", "toy, AlphaFuse (SASRec) with one setting of the official code"
    official_dreamrec = "toy, AlphaFuse (DreamRec) with one setting of the official code"
    titles = ("toy", ablated, official, official_dreamrec)
    assert set(tables) <= {title + part for title in titles for part in ("", f", {late}")}
    main, ablations, officials, officials_dreamrec = ({**tables.get(t, {}), **tables.get(f"{t}, {late}", {})}
                                                      for t in titles)
    assert sorted(main) == sorted(MAIN_ROWS)
    assert sorted(ablations) == sorted(["AlphaFuse (SASRec)", "w/o Stand", "w/o Clip (d = d_l)", "w/o Frozen"])
    assert sorted(officials) == sorted(["AlphaFuse (SASRec)", "official batch order", "official negatives"])
    assert sorted(officials_dreamrec) == sorted(["AlphaFuse (DreamRec)", "official zero directions (DreamRec)"])
    for label, run in [("AlphaFuse (SASRec)", "sasrec_alphafuse"), ("DreamRec (ID)", "dreamrec_id")]:
        def column(file, group="all"):
            v = np.array([read_json(runs / f"{run}_s{s}" / file)["test"][group]["NDCG@20"] for s in (0, 1)])
            return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"
        assert main[label][0] == "2"
        assert main[label][4] == column("metrics.json")
        assert main[label][5] == column("metrics_masked.json")
        assert main[label][6] == (column("metrics_dot.json") if run.startswith("sasrec") else "-")
        assert main[label][10] == column("metrics.json", "tail_user")
        logs = [read_log(runs / f"{run}_s{s}") for s in (0, 1)]
        best = [1 + int(np.argmax([r["valid"]["NDCG@20"] for r in log])) for log in logs]
        assert main[label][11:13] == [", ".join(map(str, best)), ", ".join(str(len(log)) for log in logs)]
        assert (label in tables.get("toy", {})) == all(b < len(log) for b, log in zip(best, logs))
    pop = read_json(runs / "popularity" / "metrics.json")["test"]["all"]
    pop_masked = read_json(runs / "popularity" / "metrics_masked.json")["test"]["all"]
    assert tables["toy"]["Popularity"][:2] == ["1", f"{pop['HR@10']:.4f}"]
    assert tables["toy"]["Popularity"][5:7] == [f"{pop_masked['NDCG@20']:.4f}", "-"]
    assert tables["toy"]["Popularity"][11:] == ["-", "-", "-"]
    for name in ("spectrum_toy.png", "curves_toy.png"):
        assert (root / "docs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(repro):
    """With one run's metrics.json gone and EPOCHS=3, only that run trains again: it resumes from
    last.pt at epoch 2 and adds epoch 3, and is evaluated again under the other protocols; every
    other run is left as it was."""
    root, _ = repro
    runs = root / "runs" / "toy"
    before = {n: (runs / n / "metrics.json").read_bytes() for n in os.listdir(runs)}
    os.remove(runs / "sasrec_id_s1" / "metrics.json")
    proc = reproduce(root, EPOCHS="3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in (runs / "sasrec_id_s1" / "train.log").read_text()
    assert [r["epoch"] for r in read_log(runs / "sasrec_id_s1")] == [1, 2, 3]
    for file in ("metrics_masked.json", "metrics_dot.json"):  # of the new ckpt.pt, not the old one
        assert os.path.getmtime(runs / "sasrec_id_s1" / file) >= os.path.getmtime(runs / "sasrec_id_s1" / "ckpt.pt")
    for name, data in before.items():
        if name != "sasrec_id_s1":
            assert (runs / name / "metrics.json").read_bytes() == data, f"{name} ran again"


def test_ctrl_c_is_one_line_and_the_rerun_continues(repro):
    """SIGINT to the whole process group (what Ctrl-C in a terminal does) while two runs train at
    once: one stderr line, exit 130, no "failed:" line; the same command again continues the run
    that had finished an epoch from its last.pt and finishes both."""
    root, _ = repro
    runs = root / "runs_int" / "toy"
    env = dict(os.environ, PY=sys.executable, SHARED=str(root / "shared"), DATA_ROOT=str(root / "data"),
               OUT=str(root / "runs_int"), DOCS=str(root / "docs_int"), DATASETS="toy", ABLATE="none",
               SEEDS="0 1", SASREC="id", DREAMREC="", EPOCHS="1000", PATIENCE="1000", JOBS="2")
    proc = subprocess.Popen(["bash", os.path.join(REPO, "reproduce.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_sigint)
    try:
        deadline = time.time() + HANG_TIMEOUT  # a guard against a hang only
        while not (runs / "sasrec_id_s0" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert err.strip() == "interrupted; rerun the same command to continue" and "failed:" not in out
    assert "interrupted; " in (runs / "sasrec_id_s0" / "train.log").read_text()
    epoch = torch.load(runs / "sasrec_id_s0" / "last.pt", weights_only=True)["epoch"]  # the log may hold one more
    again = reproduce(root, OUT=str(root / "runs_int"), DOCS=str(root / "docs_int"), ABLATE="none", SASREC="id",
                      DREAMREC="", EPOCHS=str(epoch + 1))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at epoch {epoch}" in (runs / "sasrec_id_s0" / "train.log").read_text()
    assert [r["epoch"] for r in read_log(runs / "sasrec_id_s0")] == list(range(1, epoch + 2))
    assert (runs / "sasrec_id_s1" / "metrics.json").exists()


def test_a_failing_run_fails_the_script(repro):
    root, _ = repro
    proc = reproduce(root, SASREC="nonsense", DREAMREC="", ABLATE="none", OUT=str(root / "runs_bad"))
    assert proc.returncode != 0
    assert f"failed: {root}/runs_bad/toy/sasrec_nonsense_s0/train.log" in proc.stdout
    # DREAMREC="" and ABLATE="none" queue nothing: only the failing SASRec runs of both seeds
    assert sorted(os.listdir(root / "runs_bad" / "toy")) == ["popularity", "sasrec_nonsense_s0", "sasrec_nonsense_s1"]


# -----------------------------------------------------------------------------
# report.py alone


def test_mean_std_hand_cases():
    assert report.mean_std([0.1, 0.3]) == "0.2000 ± 0.1414"
    assert report.mean_std([0.25]) == "0.2500"
    assert report.mean_std([None, 0.5, 0.7]) == "0.6000 ± 0.1414"
    assert report.mean_std([None]) == "-"


def test_report_missing_folder(tmp_path):
    assert_clean_error(run_script("report.py", tmp_path / "nope"), "nope")


def test_report_no_finished_runs(tmp_path):
    (tmp_path / "toy" / "sasrec_id_s0").mkdir(parents=True)
    (tmp_path / "toy" / "sasrec_id_s0" / "log.jsonl").write_text('{"epoch": 1}\n')
    assert_clean_error(run_script("report.py", tmp_path), str(tmp_path))


def test_report_corrupt_metrics(tmp_path):
    (tmp_path / "toy" / "sasrec_id_s0").mkdir(parents=True)
    (tmp_path / "toy" / "sasrec_id_s0" / "metrics.json").write_text('{"valid": {}}')
    proc = run_script("report.py", tmp_path, "--out", tmp_path / "results.md")
    assert_clean_error(proc, "metrics.json")
    assert not (tmp_path / "results.md").exists()
    (tmp_path / "toy" / "sasrec_id_s0" / "metrics.json").write_text('{"test": {"all": {"HR@20": 0.5}}}')
    assert_clean_error(run_script("report.py", tmp_path), "metrics.json")
    (tmp_path / "toy" / "sasrec_id_s0" / "metrics.json").write_text(json.dumps(
        {"test": {"all": dict.fromkeys(("HR@10", "HR@20", "NDCG@10", "NDCG@20"), 0.25)}}))
    (tmp_path / "toy" / "sasrec_id_s0" / "log.jsonl").write_text('{"epoch": 1}\n')
    assert_clean_error(run_script("report.py", tmp_path), "log.jsonl")


def test_report_makes_its_output_folders(tmp_path):
    """--out in a new folder and a new --plots folder are created, with the table and the curves."""
    run = tmp_path / "runs" / "toy" / "sasrec_id_s0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"test": {"all": dict.fromkeys(("HR@10", "HR@20", "NDCG@10", "NDCG@20"), 0.25)}}))
    (run / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 1.0, "valid": {"NDCG@20": v}}) + "\n"
                                           for e, v in ((1, 0.1), (2, 0.2), (3, 0.15))))
    proc = run_script("report.py", tmp_path / "runs", "--out", tmp_path / "new" / "results.md",
                      "--plots", tmp_path / "plots")
    assert proc.returncode == 0, proc.stderr
    assert "| SASRec (ID)" in (tmp_path / "new" / "results.md").read_text()
    assert (tmp_path / "plots" / "curves_toy.png").stat().st_size > 0


def test_report_tables_the_unscaled_baselines_beside_the_scaled_ones(tmp_path):
    """raw_morec (--lang_scale 1) is left out of the main table and tabled under it beside
    sasrec_morec (the default x40), each with its own NDCG@20."""
    for run, ndcg in (("sasrec_morec_s0", 0.25), ("raw_morec_s0", 0.125)):
        (tmp_path / "toy" / run).mkdir(parents=True)
        (tmp_path / "toy" / run / "metrics.json").write_text(json.dumps(
            {"test": {"all": dict.fromkeys(("HR@10", "HR@20", "NDCG@10", "NDCG@20"), ndcg)}}))
        (tmp_path / "toy" / run / "log.jsonl").write_text("".join(
            json.dumps({"epoch": e, "seconds": 1.0, "valid": {"NDCG@20": v}}) + "\n" for e, v in ((1, 0.2), (2, 0.1))))
    proc = run_script("report.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    main, unscaled = proc.stdout.split("### toy, the language baselines")
    assert "| MoRec | 1 |" in main and "unscaled" not in main
    rows = [line for line in unscaled.splitlines() if line.startswith("| MoRec")]
    assert [r.split(" | ")[0] for r in rows] == ["| MoRec", "| MoRec, unscaled"]
    assert [r.split(" | ")[5] for r in rows] == ["0.2500", "0.1250"]  # NDCG@20


def test_report_output_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "toy" / "sasrec_id_s0").mkdir(parents=True)
    (tmp_path / "file").write_text("")
    assert_clean_error(run_script("report.py", tmp_path, "--plots", tmp_path / "file" / "plots"), "file/plots")


def test_reproduce_runs_every_item_embedding_of_both_trainers_by_default():
    """reproduce.sh's default SASREC and DREAMREC lists are the trainers' --item_emb choices, and
    report.py has a label for each run they name."""
    text = open(os.path.join(REPO, "reproduce.sh")).read()
    for script, var, backbone in (("train_discriminative.py", "SASREC", "sasrec"), ("train_diffusion.py", "DREAMREC", "dreamrec")):
        default = re.search(var + r'=\$\{' + var + r'-"([^"]*)"\}', text).group(1).split()
        usage = run_script(script, "--help").stdout
        choices = re.search(r"--item_emb \{([^}]*)\}", usage).group(1).split(",")
        assert sorted(default) == sorted(choices), script
        assert all(f"{backbone}_{emb}" in report.LABELS for emb in choices), script


def test_dreamrec_rate_defaults_per_dataset(tmp_path):
    """With DIFF_LR unset, DreamRec trains at the rate of the README's probes: 1e-4 on ml-1m (1e-5
    does not stop within 200 epochs there), the official 1e-5 on every other dataset."""
    shared_toy(tmp_path, ("ml-1m", "toy"), items=80)  # ml-1m's leave-one-out split samples negatives outside L = 50
    proc = reproduce(tmp_path, DATASETS="ml-1m toy", SEEDS="0", SASREC="", DREAMREC="id", ABLATE="", DIFF_LR="", JOBS="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, lr in (("ml-1m", 1e-4), ("toy", 1e-5)):
        ckpt = torch.load(tmp_path / "runs" / name / "dreamrec_id_s0" / "ckpt.pt", weights_only=True)
        assert ckpt["config"]["lr"] == lr, name
