"""Runs rows of command-line arguments through one entry point in this one process.

    python -m tests.bad_input_worker ftsam < rows.json > outcomes.json

stdin: a JSON list of argument lists. Each row is parsed by the entry point's own flag parser
and run by `experiments.cli.guarded`, the body of `experiments.cli.run` (what `python -m
experiments.NAME` runs), in a fork of this process that defines the flags with the row as its
sys.argv; stdout: one JSON object a row,
{"code": exit code, "stderr": what it printed there}. A row may simulate a full disk
(`run_forked`). A row that raises instead of exiting
gets code "traceback" and the traceback as its stderr. One process (one JAX import) serves
all the rows of an entry point, so the bad-input suite stays in the fast tier's budget.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import os
import pathlib
import sys
import traceback

from experiments import cli


def run_row(module, args: list[str]) -> dict[str, object]:
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            argv = cli._parse_flags([module.__name__, *args])
            cli.guarded(module.main, argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
            code = "traceback"
            err.write(traceback.format_exc())
    return {"code": code, "stderr": err.getvalue()}


def refuse_writes(name: str) -> None:
    """Makes every write of the file `name` through `experiments.workdir.atomic_write` (its
    temporary file NAME.tmp) fail as on a full disk."""
    write_text = pathlib.Path.write_text

    def full_disk(path: pathlib.Path, data: str, *args, **kwargs) -> int:
        if path.name == f"{name}.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_text(path, data, *args, **kwargs)

    pathlib.Path.write_text = full_disk


def run_forked(module, args: list[str]) -> dict[str, object]:
    """`run_row` in a fork of this process (modules imported, no JAX backend started yet): each
    row starts from fresh flags and module state, at the cost of a fork, not an import. A first
    argument `@enospc:NAME` is no flag: writes of the file NAME fail in that row
    (`refuse_writes`)."""
    fault = args[0].removeprefix("@enospc:") if args and args[0].startswith("@enospc:") else None
    args = args[1:] if fault is not None else args
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        # As `python -m`: the flags are defined with this row as sys.argv (ml_collections
        # registers the --config.FIELD overrides it finds there when --config is defined).
        sys.argv = [module.__name__, *args]
        if fault is not None:
            refuse_writes(fault)
        module.define_flags()
        with os.fdopen(write_fd, "w") as out:
            out.write(json.dumps(run_row(module, args)))
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as inp:
        text = inp.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"code": f"died (wait status {status})", "stderr": ""}
    return json.loads(text)


def main() -> None:
    module = importlib.import_module(f"experiments.{sys.argv[1]}")
    rows = json.load(sys.stdin)
    print(json.dumps([run_forked(module, args) for args in rows]))


if __name__ == "__main__":
    main()
