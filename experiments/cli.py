"""What every entry point shares: one-line input errors with exit code 2, flag parsing."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from jax.sharding import Mesh
from ml_collections.config_flags import config_path

from ftsam_jax import parallel
from ftsam_jax.checkpoint import CheckpointError, WriteError, wait_for_saves
from ftsam_jax.data import DataError
from ftsam_jax.training import stage as runner
from ftsam_jax.training.stage import NonFiniteLossError

__all__ = ["DTYPES", "InputError", "check_batch_fits", "comma_list", "compute_dtype",
           "config_from_flags", "distinct_ints", "error_line", "fail", "guarded", "interruptible",
           "make_mesh", "run", "start_child", "wait_for_exit"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Child processes an entry point runs (experiments.table's cells): an interrupted parent
# passes its signal on to them and waits for them to stop (they checkpoint and say where).
children: set[subprocess.Popen] = set()
# Set (under `children_lock`) when an interruption begins: a parent starts no child after it,
# and one started before it is in `children` when the signal is passed on (`start_child`).
stopping = threading.Event()
children_lock = threading.Lock()
# What a parent of such children is doing (e.g. "in cell [3/12] blended / ft / seed 0"), for
# the interruption message of a process that runs no stage itself.
current_task: str | None = None


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
    """The items of a comma-separated config field (`"ft, ftsam"` -> ["ft", "ftsam"]); a comma
    inside brackets belongs to its item (`"ft,ftsam[rho=0,adaptive=false]"`: two items)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


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


# A shorthand flag's tree path ("rho": "defense.ftsam.rho"), or a choice: the flag's value ->
# the tree paths and values it sets ("ftsam_recipe": {"paper": {"defense.ftsam.schedule": ...}}).
Alias = str | Mapping[str, Mapping[str, Any]]


def config_from_flags(get_config: Callable[[str], ml_collections.ConfigDict],
                      aliases: Sequence[str] | Mapping[str, Alias], *,
                      paths: Callable[[ml_collections.ConfigDict, str], list[str]] | None = None,
                      flag_values: flags.FlagValues | None = None) -> ml_collections.ConfigDict:
    """The run's config tree: `--config` (a config file with its `--config.FIELD=VALUE`
    overrides, `config_flags`) or `get_config(--preset)`, then every alias flag given on the
    command line, in the order of `aliases`: a sequence of names (each flag sets the tree's
    field of the same name) or a mapping flag -> `Alias`. `paths(tree, path)` names the fields
    an alias path stands for in this tree (default: the path itself). Values are set with
    `ml_collections.config_flags.config_path.set_value` (list flags joined by commas); a value
    of the wrong type for its field is an InputError."""
    FLAGS = flags.FLAGS if flag_values is None else flag_values
    try:  # a copy that keeps the fields' types (placeholders too)
        loaded = None if FLAGS.config is None else copy.deepcopy(FLAGS.config)
    except OSError as e:  # config_flags reports a file it could not load on first use
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(f"cannot load {FLAGS['config'].serialize()}: {lines[-1]}") from None
    if loaded is not None:
        if FLAGS["preset"].present:
            raise InputError("give --preset or --config (whose argument is the preset), not both")
        cfg = loaded
        cfg.unlock()
    else:
        cfg = get_config(FLAGS.preset)
    table = aliases if isinstance(aliases, Mapping) else {name: name for name in aliases}
    for name, alias in table.items():
        if not FLAGS[name].present:
            continue
        value = FLAGS[name].value
        if isinstance(alias, str):
            assignments = {alias: ",".join(value) if isinstance(value, list) else value}
        elif value in alias:
            assignments = alias[value]
        else:
            raise InputError(f"--{name} must be one of {sorted(alias)}, got {value!r}")
        for path, field_value in assignments.items():
            for concrete in (paths or (lambda tree, p: [p]))(cfg, path):
                try:
                    config_path.set_value(concrete, cfg, field_value)
                except (KeyError, TypeError, ValueError) as e:
                    raise InputError(f"--{name}: {e}") from None
    return cfg


def error_line(error: object) -> str:
    """The one `error: ...` line of an error (its message on one line); a refused write
    (`WriteError`) names its file relative to the run's workdir."""
    if isinstance(error, WriteError):
        from experiments.workdir import held_workdirs  # imports this module

        error = error.describe(held_workdirs())
    return "error: " + " ".join(str(error).split())


def fail(message: object) -> NoReturn:
    print(error_line(message), file=sys.stderr)
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


def _stopped_message(signum: int) -> str:
    where = runner.position() or current_task or "before the first training stage"
    return (f"interrupted ({signal.Signals(signum).name}) {where}: rerun the same command to "
            "resume from the last checkpoint")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM stop the process within moments, even in the middle of a compiled
    epoch (where the main thread sits in XLA and Python's handlers cannot run): Python's C-level
    handler writes the signal number to a wakeup pipe at once, a watcher thread reads it, waits
    for pending checkpoint saves to commit, prints one line saying where the run stopped and
    exits with 128 + the signal number. Everything a run writes is atomic (results by rename,
    checkpoints committed by orbax), so the same command resumes to the same numbers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        data = os.read(read_fd, 1)
        if not data or data[0] == 0:  # the run ended normally
            return
        signum = data[0]
        with children_lock:
            stopping.set()
            running = list(children)
        for child in running:
            with contextlib.suppress(OSError):
                child.send_signal(signum)
        for child in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=30)
        wait_for_saves()
        sys.stdout.flush()
        print(_stopped_message(signum), file=sys.stderr, flush=True)
        os._exit(128 + signum)

    watcher = threading.Thread(target=watch, name="signal-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.write(write_fd, b"\0")
        watcher.join()
        os.close(read_fd)
        os.close(write_fd)


def start_child(cmd: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Starts a child process that an interruption of this one passes its signal on to
    (`children`); once an interruption has begun, starts none and waits for the exit
    `interruptible` makes (so no child outlives an interrupted parent)."""
    with children_lock:
        if not stopping.is_set():
            proc = subprocess.Popen(cmd, **popen_kwargs)
            children.add(proc)
            return proc
    wait_for_exit()
    raise AssertionError("unreachable")


def wait_for_exit() -> None:
    """Blocks the main thread while an interruption (`interruptible`'s watcher) ends the
    process; returns at once when none is under way."""
    if stopping.is_set():
        threading.Event().wait()


def guarded(main: Callable[[list[str]], None], argv: list[str]) -> None:
    """Calls `main(argv)` with the project's error contract: positional arguments, InputError,
    DataError and an unreadable checkpoint (CheckpointError) -> one `error: ...` line + exit 2;
    a non-finite loss or a write the disk refused (WriteError: no space, no permission, a
    read-only or failing disk) -> one line + exit 1 (what was committed before is kept: the
    same command resumes once the cause is fixed; the workdir's lock ends with the process); Ctrl-C
    or SIGTERM -> one line saying where the run stopped + exit 130 / 143 (`interruptible`; the
    finished epochs are checkpointed: rerunning the same command resumes)."""
    if len(argv) > 1:
        fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
    try:
        with interruptible():
            main(argv)
    except (InputError, DataError, CheckpointError) as e:
        fail(e)
    except (NonFiniteLossError, WriteError) as e:
        wait_for_saves()  # the other stages' pending checkpoints (a refused one is dropped)
        print(error_line(e), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # raised by the runner's test hook (FTSAM_JAX_INTERRUPT_AFTER)
        print(_stopped_message(signal.SIGINT), file=sys.stderr)
        sys.exit(130)


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run` of `main` under `guarded` (flag errors too are one line + exit 2)."""

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
        guarded(main, argv)

    app.run(wrapped, flags_parser=_parse_flags)
