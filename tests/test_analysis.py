"""Neuron norms and TAC against loops written from their definitions; plots are written."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax.analysis import last_conv_path, layer_output, neuron_norms, run_analysis, tac
from ftsam_jax.models import PreActResNet18, TinyCNN


def test_norms_and_tac_match_loops(tmp_path):
    model = TinyCNN(num_classes=3, width=4)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    path = last_conv_path(model)
    kernel = np.asarray(variables["params"]["conv2"]["kernel"])
    expected = [np.sqrt(sum(kernel[i, j, c, k] ** 2 for i in range(3) for j in range(3)
                            for c in range(kernel.shape[2]))) for k in range(kernel.shape[3])]
    np.testing.assert_allclose(neuron_norms(variables["params"], path), expected, rtol=1e-6)

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 200, (6, 8, 8, 3), dtype=np.uint8)
    poisoned = clean.copy()
    poisoned[:, -2:, -2:] = 255
    f_c = layer_output(model, variables, clean, path)
    f_p = layer_output(model, variables, poisoned, path)
    assert f_c.shape == (6, 4, 4, 8)
    ref = np.zeros(8)
    for n in range(6):
        for k in range(8):
            ref[k] += np.abs(f_p[n, :, :, k] - f_c[n, :, :, k]).sum() / 6
    np.testing.assert_allclose(tac(model, variables, clean, poisoned, path), ref, rtol=1e-5)

    other = jax.tree.map(lambda a: a * 0.5, variables)
    report = run_analysis(model, {"backdoored": variables, "halved": other}, clean, poisoned,
                          tmp_path)
    assert report["layer"] == "conv2" and len(report["models"]["halved"]["norms"]) == 8
    def reject(token: str) -> None:
        raise ValueError(f"analysis.json is not strict JSON: {token}")

    written = json.loads((tmp_path / "analysis.json").read_text(), parse_constant=reject)
    assert written["images"] == 6
    # The backdoored model's norm change is zero: its correlation is undefined, i.e. null.
    assert written["models"]["backdoored"]["corr_norm_change_tac_backdoored"] is None
    assert (tmp_path / "norm_vs_tac.png").stat().st_size > 0
    assert (tmp_path / "norm_hist.png").stat().st_size > 0


def test_preact_resnet_analysis_layer_is_the_last_block_conv2():
    assert last_conv_path(PreActResNet18(width=4)) == ("layer4_1", "conv2")
