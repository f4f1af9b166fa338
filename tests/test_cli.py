"""The package and the command-line contract: `import cm3leon` has no side effects, and every
script reports usage errors in one line with exit code 2 while real crashes keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cm3leon.cli import USAGE_EXIT_CODE, hydra_entry, one_line, usage_error_of
from cm3leon.errors import UsageError
from project import SRC_DIR


def test_import_sets_nothing_in_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    code = "import os, cm3leon, cm3leon.generation, cm3leon.retrieval; print(sorted(os.environ) == sorted(ENV))"
    proc = subprocess.run(
        [sys.executable, "-c", code.replace("ENV", repr(sorted(env)))],
        cwd=tmp_path,  # any folder: the installed package, not the checkout's src/
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]


def write_script(tmp_path, body: str):
    """A script `src/x.py` in a fake checkout with conf/x.yaml, decorated by hydra_entry."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "conf" / "x.yaml").write_text("what: ok\n")
    script = tmp_path / "src" / "x.py"
    script.write_text(
        "from cm3leon.cli import hydra_entry\n"
        "from cm3leon.errors import UsageError\n\n"
        '@hydra_entry("x", __file__)\n'
        "def main(cfg):\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "\n"
        'if __name__ == "__main__":\n    main()\n'
    )
    return script


@pytest.mark.parametrize(
    "body,args,code,one_line",
    [
        ("print(cfg.what)", [], 0, None),
        ('raise UsageError("data.x=/nope not found: pass data.x=PATH")', [], USAGE_EXIT_CODE, "data.x=/nope"),
        ('open("/nope/file")', [], USAGE_EXIT_CODE, "/nope/file"),
        ("print(cfg.what)", ["nokey=1"], USAGE_EXIT_CODE, "+nokey=1"),  # Hydra cannot compose it: one line too
        ('raise RuntimeError("a real bug")', [], 1, None),  # a crash: the traceback stays
    ],
)
def test_error_policy(tmp_path, body, args, code, one_line):
    script = write_script(tmp_path, body)
    proc = subprocess.run(
        [sys.executable, str(script), f"hydra.run.dir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    if one_line:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and one_line in lines[0], proc.stderr
    if code == 1:
        assert "a real bug" in proc.stderr and "RuntimeError" in proc.stderr


def test_hydra_reports_become_one_line():
    report = (
        "In 'train': Could not find 'model/nosuch'\n\nAvailable options in 'model':\n\t350m\n\ttiny\n"
        "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n\n"
        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    )
    assert one_line(report) == "In 'train': Could not find 'model/nosuch'; Available options in 'model': 350m, tiny"


def test_usage_errors_raised_inside_instantiate_are_found():
    from hydra.errors import InstantiationException

    cause = UsageError("x")
    wrapped = InstantiationException("Error in call to target 'X'")
    wrapped.__cause__ = cause
    assert usage_error_of(wrapped) is cause
    assert usage_error_of(RuntimeError("y")) is None
    assert callable(hydra_entry("train", SRC_DIR / "train.py")(lambda cfg: None))
