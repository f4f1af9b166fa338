"""The command-line contract of every entry script in `src/`: one Hydra entry point, one error policy.

    # src/generate.py
    from cm3leon.cli import hydra_entry

    @hydra_entry("generate", __file__)
    def main(cfg):          # the task: compose happened, cfg is the resolved config
        ...

    if __name__ == "__main__":
        main()

Error policy:
- a `UsageError` (or `FileNotFoundError`) raised by the task is printed as one line,
  `error: <message>`, and the script exits with code 2 (no traceback), also when Hydra's
  `instantiate` raised it while building an object of the config;
- a bad command line that Hydra cannot compose (unknown key, wrong group option, bad override
  syntax) is the same: Hydra's message condensed to one line, exit code 2;
- anything else is a real crash: Hydra prints its traceback (HYDRA_FULL_ERROR=1 for the whole one)
  and the exit code is 1.

Before composing, the typed schemas of `cm3leon.config` are registered (conf/model/*.yaml and
conf/train_tokenizer.yaml build on them). The checkout's root is derived from the entry script's path (`src/<script>.py` -> its parent's
parent) and handed to the configs as the PROJECT_ROOT environment variable (conf/paths); the
library itself never reads it.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cm3leon.errors import UsageError

USAGE_EXIT_CODE = 2
_USAGE_ERRORS = (UsageError, FileNotFoundError)

__all__ = ["USAGE_EXIT_CODE", "UsageError", "hydra_entry", "project_root"]


def project_root(script: str | Path) -> Path:
    """The checkout holding the entry script `script` (`<root>/src/<script>.py`)."""
    return Path(script).resolve().parents[1]


def usage_error_of(error: BaseException) -> BaseException | None:
    """The usage error behind `error` (itself, or the cause Hydra's instantiate wrapped), or None."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, _USAGE_ERRORS) else None


def report_usage_error(error: BaseException) -> None:
    """Print a usage error as one line and exit with `USAGE_EXIT_CODE`."""
    message = (
        str(error)
        if not isinstance(error, FileNotFoundError) or not error.filename
        else (f"{error.filename}: {error.strerror or 'not found'}")
    )
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


# lines of Hydra's composition-error report that locate rather than explain
_HYDRA_NOISE = (
    "full_key:",
    "object_type=",
    "reference_type=",
    "Set the environment variable HYDRA_FULL_ERROR",
    "Config search path",
    "provider=",
)


def one_line(report: str) -> str:
    """Hydra's multi-line composition-error report as one line (a list under `...:` joined by commas)."""
    parts: list[str] = []
    listing = False
    for line in (raw.strip() for raw in report.splitlines()):
        if not line or line.startswith(_HYDRA_NOISE):
            continue
        if listing and " " not in line:  # an item of the list the previous line announced
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        parts.append(line.rstrip("."))
    return "; ".join(parts)


class _HeldStderr(list):
    """The process's stderr while Hydra composes (see `hydra_entry`). A launcher that ships the task
    to another process (submitit pickles it) ships an empty hold: a stream cannot be pickled, and
    the other process keeps its own stderr."""

    def __reduce__(self):
        return (_HeldStderr, ())


def hydra_entry(config_name: str, script: str | Path) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Decorate `task(cfg)` as the script's `main()`: Hydra composes `<root>/conf/<config_name>.yaml`
    with the command line, then runs the task under the error policy above. `main()` returns the
    task's return value (what Hydra's sweepers optimise)."""
    root = project_root(script)

    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        import hydra

        started = False

        real_stderr = _HeldStderr()  # sys.stderr while Hydra composes is a buffer (see main)

        def restore_stderr() -> str:
            """Give the process its stderr back; return what was written meanwhile."""
            if not real_stderr:
                return ""
            buffer, sys.stderr = sys.stderr, real_stderr.pop()
            return buffer.getvalue() if isinstance(buffer, io.StringIO) else ""

        @hydra.main(version_base="1.3", config_path=str(root / "conf"), config_name=config_name)
        @functools.wraps(task)
        def hydra_main(cfg):
            nonlocal started
            started = True
            sys.stderr.write(restore_stderr())  # composed: whatever Hydra said is not an error
            try:
                return task(cfg)
            except Exception as e:
                usage = usage_error_of(e)
                if usage is None:
                    raise  # a real crash: Hydra prints the traceback
                report_usage_error(usage)

        @functools.wraps(task)
        def main() -> Any:
            from cm3leon.config import register_configs

            register_configs()
            os.environ.setdefault("PROJECT_ROOT", str(root))
            # Hydra reports a command line it cannot compose in several lines on stderr, then exits 1:
            # hold stderr until the task starts, so that such a report becomes one line (exit 2)
            real_stderr.append(sys.stderr)
            sys.stderr = io.StringIO()
            try:
                return hydra_main()
            except SystemExit as e:
                held = restore_stderr()
                if e.code == 1 and not started and held.strip():
                    print(f"error: {one_line(held)}", file=sys.stderr)
                    sys.exit(USAGE_EXIT_CODE)
                sys.stderr.write(held)
                raise
            finally:
                sys.stderr.write(restore_stderr())  # --help, --cfg: nothing was wrong

        main.task = task  # the undecorated task, for tests and notebooks
        return main

    return decorate
