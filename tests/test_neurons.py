"""experiments.neurons: the neuron analysis (FT-SAM Fig. 2, 4, 5, 6 a/b) on a study's cells.

Parity of the numeric pieces against slow references written from their definitions (plain
numpy loops), the study summary on synthetic reports, and (slow) the command end to end on a
smoke `experiments.table` LF study (its cached trigger) with two backdoored models.
"""

import json
import math
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import neurons
from ftsam_jax.analysis import last_conv_path, tac
from ftsam_jax.models import create_model
from tests.conftest import ENV, ROOT


def _ranks(values):
    """Ranks 1..n by a selection loop (no ties in the test data)."""
    out = [0.0] * len(values)
    for i, v in enumerate(values):
        out[i] = 1.0 + sum(1 for w in values if w < v)
    return out


def _pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb)


def test_statistics_match_loops():
    rng = np.random.default_rng(3)
    n = 40
    tac_bd = rng.random(n)
    before = 0.5 + rng.random(n)
    after = before * np.exp(rng.normal(0, 0.1, n))
    share = 0.05
    k = max(1, round(share * n))  # 2 neurons
    order = sorted(range(n), key=lambda i: -tac_bd[i])
    high = set(order[:k])
    inside = [math.log(after[i] / before[i]) for i in range(n) if i in high]
    outside = [math.log(after[i] / before[i]) for i in range(n) if i not in high]
    expected = sum(inside) / len(inside) - sum(outside) / len(outside)

    mask = neurons.top_tac_mask(tac_bd, share)
    assert sorted(np.flatnonzero(mask).tolist()) == sorted(high)
    assert neurons.high_tac_log_change(before, after, mask) == pytest.approx(expected, rel=1e-12)
    total = sum(after)
    assert neurons.norm_share(after, mask) == pytest.approx(
        sum(after[i] for i in high) / total, rel=1e-12)
    expected_rho = _pearson(_ranks(list(before)), _ranks(list(tac_bd)))
    assert neurons.spearman(before, tac_bd) == pytest.approx(expected_rho, rel=1e-10)
    assert neurons.spearman(np.ones(n), tac_bd) is None
    # A zero norm (a pruned neuron) leaves the statistic undefined rather than infinite.
    assert neurons.high_tac_log_change(before, np.where(np.arange(n) == 0, 0.0, after),
                                       mask) is None


def _tiny():
    model = create_model("tiny_cnn", 4, width=4)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)), train=False)
    return model, variables


def test_tac_matches_loops():
    model, variables = _tiny()
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    poisoned = clean.copy()
    poisoned[:, -3:, -3:] = 255
    path = last_conv_path(model)

    def features(x):
        _, state = model.apply(variables, x.astype(np.float32) / 255.0, train=False,
                               capture_intermediates=True, mutable=["intermediates"])
        return np.asarray(state["intermediates"]["conv2"]["__call__"][0], np.float64)

    fc, fb = features(clean), features(poisoned)
    n, h, w, c = fc.shape
    expected = []
    for k in range(c):
        total = 0.0
        for i in range(n):
            total += sum(abs(fb[i, y, x, k] - fc[i, y, x, k]) for y in range(h) for x in range(w))
        expected.append(total / n)
    np.testing.assert_allclose(tac(model, variables, clean, poisoned, path), expected,
                               rtol=1e-5, atol=1e-6)


def test_sam_gradient_norms_match_definition():
    """FT-SAM Eq. 4/6 by hand: e = rho |w|^2 g / ||(|w| g)||, the gradient at w + e, and each
    output channel's L2 norm of the last conv kernel's gradient by loops."""
    from ftsam_jax.training.step import classification_loss

    model, variables = _tiny()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 8)
    path = last_conv_path(model)
    rho, smoothing = 2.0, 0.1
    got = neurons.first_batch_gradient_norms(model, variables, images, labels, path,
                                             label_smoothing=smoothing, rho=rho)

    loss_fn = classification_loss(model.apply, smoothing)
    batch = {"image": jnp.asarray(images, jnp.float32) / 255.0,
             "label": jnp.asarray(labels, jnp.int32)}
    params, stats = variables["params"], variables["batch_stats"]

    def grad(p):
        return jax.grad(lambda q: loss_fn(q, stats, batch, None)[0])(p)

    g = jax.tree.map(lambda a: np.asarray(a, np.float64), grad(params))
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    norm = math.sqrt(sum(float(np.sum((np.abs(wl) * gl) ** 2)) for wl, gl in
                         zip(jax.tree.leaves(w), jax.tree.leaves(g), strict=True)))
    perturbed = jax.tree.map(lambda wl, gl: jnp.asarray(wl + rho * wl**2 * gl / norm,
                                                        jnp.float32), w, g)
    g_sam = grad(perturbed)

    def per_channel(tree):
        kernel = np.asarray(tree["conv2"]["kernel"], np.float64)
        return [math.sqrt(sum(float(v) ** 2 for v in kernel[..., k].ravel()))
                for k in range(kernel.shape[-1])]

    np.testing.assert_allclose(got["plain"], per_channel(g), rtol=1e-5)
    np.testing.assert_allclose(got["sam"], per_channel(g_sam), rtol=1e-4, atol=1e-7)
    assert "sam" not in neurons.first_batch_gradient_norms(model, variables, images, labels,
                                                           path, rho=0.0)


def _report(attack, m, ds, stats):
    """A minimal analysis.json: `stats` column -> high_tac_log_change."""
    base = {"clean_acc": 0.9, "asr": 1.0, "spearman_norm_tac": 0.5, "std_norm": 0.1,
            "cv_norm": 0.2, "top_tac_norm_share": 0.1}
    cols = {n: {**base, "spearman_norm_tac_backdoored": 0.4, "std_ratio": 1.0,
                "high_tac_log_change": v, "spearman_log_change_tac": -0.1,
                "mean_grad_norm": 1.0, "spearman_grad_tac": 0.0} for n, v in stats.items()}
    return {"attack": attack, "model_seed": m, "defense_seed": ds,
            "models": {"backdoored": base, **cols}}


def test_summary_averages_defense_seeds_before_models():
    reports = [_report("blended", 0, 0, {"ft": 0.0, "ftsam": -1.0}),
               _report("blended", 0, 1, {"ft": 0.0, "ftsam": -3.0}),  # model 0: ftsam -2
               _report("blended", 1, 0, {"ft": 1.0, "ftsam": -3.0})]  # model 1: diff -4
    out = neurons.summarize(reports, [("ftsam", "ft"), ("ftsam", "nope")])["attacks"]["blended"]
    assert out["models"]["0"]["columns"]["ftsam"]["high_tac_log_change"] == -2.0
    d = out["differences"]["ftsam - ft"]["high_tac_log_change"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(-3.0) and d["model_seeds"] == [0, 1]
    from scipy import stats
    half = stats.t.ppf(0.975, 1) * np.std([-2.0, -4.0], ddof=1) / math.sqrt(2)
    assert d["ci_low"] == pytest.approx(-3.0 - half) and d["ci_high"] == pytest.approx(-3 + half)
    assert "ftsam - nope" not in out["differences"]
    assert out["intervals"]["ftsam"]["high_tac_log_change"]["mean"] == pytest.approx(-2.5)


def test_the_pooled_block_is_over_every_backdoored_model_and_pairs_defense_seeds():
    """The pre-stated unit: every backdoored model of every attack (here 3: n = 3, t_2); a
    defense seed that one column lacks is left out of that model's difference (not compared
    against the other column's two-seed mean)."""
    reports = [_report("badnets", 0, 0, {"ft": 0.0, "ftsam": -1.0}),
               _report("badnets", 0, 1, {"ft": 2.0, "ftsam": -3.0}),  # model diff -3
               _report("blended", 0, 0, {"ft": 1.0, "ftsam": 0.0}),
               _report("blended", 0, 1, {"ft": 5.0}),  # ftsam lacks seed 1: diff -1, not -3
               _report("blended", 1, 0, {"ft": 0.0, "ftsam": 1.0})]  # diff +1
    out = neurons.summarize(reports, [("ftsam", "ft")])
    assert out["all"]["models"] == ["badnets/m0", "blended/m0", "blended/m1"]
    d = out["all"]["differences"]["ftsam - ft"]["high_tac_log_change"]
    from scipy import stats
    per_model = [-3.0, -1.0, 1.0]
    half = stats.t.ppf(0.975, 2) * np.std(per_model, ddof=1) / math.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(-1.0)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(-1 - half), pytest.approx(-1 + half))
    assert not d["resolved"] and d["models"] == out["all"]["models"]
    blended = out["attacks"]["blended"]["differences"]["ftsam - ft"]["high_tac_log_change"]
    assert blended["mean"] == pytest.approx(0.0) and blended["model_seeds"] == [0, 1]
    pooled_ftsam = out["all"]["intervals"]["ftsam"]["high_tac_log_change"]
    assert pooled_ftsam["n"] == 3 and pooled_ftsam["mean"] == pytest.approx((-2 + 0 + 1) / 3)
    md = neurons.neurons_markdown({"top_share": 0.05, "failures": [], **out})
    assert "## all: every backdoored model of every attack" in md


def _run(module, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_neurons_end_to_end_on_smoke_study(toy_npz, tmp_path):
    study = tmp_path / "study"
    _run("experiments.table", f"--dataset=npz:{toy_npz}", "--preset=smoke",
         "--attacks=lf", "--defenses=ft,ftsam", "--defense_seeds=0",
         "--model_seeds=0,1", "--ftsam_flag=--defense_epochs=1", f"--workdir={study}")
    out = _run("experiments.neurons", f"--study={study}").stdout
    assert out.count("analysing") == 2
    for attack in ("lf",):
        for m in (0, 1):
            folder = study / attack / f"m{m}" / "ds0" / "analysis"
            report = json.loads((folder / "analysis.json").read_text())
            assert report["layer"] == "conv2" and report["neurons"] == 16
            assert report["verified"]["max_abs_difference"] <= 1e-9
            assert set(report["models"]) == {"backdoored", "ft", "ftsam"}
            for entry in report["models"].values():
                assert len(entry["norms"]) == len(entry["tac"]) == 16
                assert -1 <= entry["spearman_norm_tac"] <= 1
            assert report["gradients"]["ft"]["sam"] is False
            assert report["gradients"]["ftsam"]["sam"] is True
            # The shared subset: both columns' first batch is the same images.
            assert report["gradients"]["ft"]["batch"] == report["gradients"]["ftsam"]["batch"]
            for png in ("norm_vs_tac.png", "norm_hist.png", "grad_vs_tac.png"):
                assert (folder / png).stat().st_size > 0
    summary = json.loads((study / "neurons.json").read_text())
    assert summary["failures"] == []
    d = summary["attacks"]["lf"]["differences"]["ftsam - ft"]["high_tac_log_change"]
    per_model = []
    for m in (0, 1):
        r = json.loads((study / "lf" / f"m{m}" / "ds0" / "analysis" / "analysis.json")
                       .read_text())["models"]
        per_model.append(r["ftsam"]["high_tac_log_change"] - r["ft"]["high_tac_log_change"])
    assert d["n"] == 2 and d["mean"] == pytest.approx(np.mean(per_model))
    pooled = summary["all"]["differences"]["ftsam - ft"]["high_tac_log_change"]
    assert pooled["models"] == ["lf/m0", "lf/m1"] and pooled["mean"] == pytest.approx(d["mean"])
    assert "## lf" in (study / "neurons.md").read_text()
    # Resumable: nothing recomputed; a removed analysis is recomputed to the same numbers.
    again = _run("experiments.neurons", f"--study={study}").stdout
    assert again.count("done earlier") == 2 and "analysing" not in again
    target = study / "lf" / "m1" / "ds0" / "analysis"
    before = json.loads((target / "analysis.json").read_text())
    shutil.rmtree(target)
    third = _run("experiments.neurons", f"--study={study}").stdout
    assert third.count("analysing") == 1
    assert json.loads((target / "analysis.json").read_text()) == before
    # The one-line error contract.
    bad = _run("experiments.neurons", f"--study={tmp_path / 'none'}", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1
