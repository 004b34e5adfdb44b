"""One process of the multi-process test: a train and a SAM step on a mesh over every process's
CPU devices; process 0 writes the resulting parameters (npz) to argv[1].

Launched by tests/test_multiprocess.py as 2 processes x 2 devices (gloo collectives on
127.0.0.1) and as 1 process x 4 devices; both must give the same numbers.
"""

import os
import sys

# the test passes its XLA_FLAGS (the device count and the suite's cheap compiles); alone:
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2" if os.environ.get(
    "JAX_NUM_PROCESSES") else "--xla_force_host_platform_device_count=4")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402

import ftsam_jax  # noqa: E402
from ftsam_jax import parallel, xla  # noqa: E402
from ftsam_jax.models import create_model  # noqa: E402
from ftsam_jax.training.step import classification_loss, create_train_state  # noqa: E402


def main(out: str) -> None:
    parallel.initialize_distributed()
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 4, mesh.devices.size
    model = create_model("tiny_cnn", 10, width=4)
    loss_fn = classification_loss(model.apply)
    rng = np.random.default_rng(0)
    images = rng.random((16, 12, 12, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    data = parallel.data_sharding(mesh)
    batch = {"image": jax.make_array_from_callback(images.shape, data, lambda i: images[i]),
             "label": jax.make_array_from_callback(labels.shape, data, lambda i: labels[i])}
    result = {}
    for name, step, tx in (
            ("train", ftsam_jax.train_step, optax.sgd(0.1, momentum=0.9)),
            ("sam", ftsam_jax.sam_step, ftsam_jax.sam(optax.sgd(0.1, momentum=0.9), 2.0,
                                                      adaptive=True))):
        state = parallel.replicate(create_train_state(model, tx, jax.random.key(0), (12, 12, 3)),
                                   mesh)
        fn = xla.jit(lambda s, b, tx=tx, step=step: step(s, b, jax.random.key(1), tx=tx,
                                                           loss_fn=loss_fn),
                     out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
        for _ in range(2):
            state, _ = fn(state, batch)
        leaves = jax.tree.leaves(state.params)
        result.update({f"{name}_{i}": np.asarray(x.addressable_data(0))
                       for i, x in enumerate(leaves)})
    if jax.process_index() == 0:
        np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1])
