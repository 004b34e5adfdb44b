"""What every entry point shares: one-line input errors with exit code 2, flag parsing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from jax.sharding import Mesh

from ftsam_jax import parallel
from ftsam_jax.checkpoint import CheckpointError
from ftsam_jax.data import DataError
from ftsam_jax.runner import NonFiniteLossError

__all__ = ["DTYPES", "InputError", "check_batch_fits", "comma_list", "compute_dtype",
           "config_from_flags", "distinct_ints", "fail", "make_mesh", "run"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class InputError(ValueError):
    """Bad user input (flags, files): reported as `error: ...` on stderr, exit code 2."""


def make_mesh() -> Mesh:
    """Joins a multi-process launch if this is one (an incomplete launch is an InputError),
    then the mesh over every device of every process."""
    try:
        parallel.initialize_distributed()
    except ValueError as e:
        raise InputError(e) from None
    return parallel.make_mesh()


def check_batch_fits(batch_size: int, num_examples: int, unit: str = "images") -> None:
    """InputError unless one batch fits in the training set (a larger one would only repeat
    the set inside every batch and grow memory without bound)."""
    if batch_size > num_examples:
        raise InputError(f"--batch_size {batch_size} is larger than the training set "
                         f"({num_examples} {unit})")


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated config field (`"ft, ftsam"` -> ["ft", "ftsam"])."""
    return [item.strip() for item in text.split(",") if item.strip()]


def distinct_ints(text: str, name: str) -> list[int]:
    """The distinct integers of a comma-separated value (`--seeds=0,1,2`); InputError else."""
    try:
        values = [int(item) for item in comma_list(text)]
    except ValueError:
        raise InputError(f"--{name} must be integers, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise InputError(f"--{name} must list distinct integers, got {text!r}")
    return values


def compute_dtype(name: str) -> jnp.dtype:
    """The compute dtype of a `dtype` setting (float32 | bfloat16); InputError else."""
    if name not in DTYPES:
        raise InputError(f"--dtype must be float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def config_from_flags(get_config: Callable[[str], ml_collections.ConfigDict],
                      shorthands: Sequence[str]) -> ml_collections.ConfigDict:
    """The run's config tree: `--config` (a config file with its `--config.FIELD=VALUE`
    overrides, `config_flags`) or `get_config(--preset)`, then every flag of `shorthands` that
    was given on the command line (a flag and the tree's field of the same name)."""
    FLAGS = flags.FLAGS
    try:
        loaded = None if FLAGS.config is None else FLAGS.config.to_dict()
    except OSError as e:  # config_flags reports a file it could not load on first use
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(f"cannot load {FLAGS['config'].serialize()}: {lines[-1]}") from None
    if loaded is not None:
        if FLAGS["preset"].present:
            raise InputError("give --preset or --config (whose argument is the preset), not both")
        cfg = ml_collections.ConfigDict(loaded)
    else:
        cfg = get_config(FLAGS.preset)
    for name in shorthands:
        if FLAGS[name].present:
            value = FLAGS[name].value
            cfg[name] = ",".join(value) if isinstance(value, list) else value
    return cfg


def fail(message: object) -> NoReturn:
    text = " ".join(str(message).split())
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # a config file that failed to load
            head = text.split("Traceback (most recent call last)")[0].rstrip(": \n")
            text = f"{head}: {text.strip().splitlines()[-1]}"
        fail(text)
    except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD that does not exist
        fail(f"no config field {e.args[0] if e.args else e}: see the config file's fields")
    except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
        fail(f"config override: {e}")


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run` with flag errors, InputError, DataError and an unreadable checkpoint
    (CheckpointError) turned into one line + exit 2,
    a non-finite loss into one line + exit 1 (its stage's last good checkpoint is kept), and
    Ctrl-C into a hint to rerun (exit 130)."""

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
        if len(argv) > 1:
            fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
        try:
            main(argv)
        except (InputError, DataError, CheckpointError) as e:
            fail(e)
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume from the last checkpoint",
                  file=sys.stderr)
            sys.exit(130)

    app.run(wrapped, flags_parser=_parse_flags)
