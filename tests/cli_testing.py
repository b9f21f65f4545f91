"""``fedtune run`` as a test calls it: in this process (its imports are paid once per session)
or, where the process boundary is the point, as a real ``python -m fedtune.cli`` child."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fedtune_run(args: list[str], cwd: Path | None = None, child: bool = False) -> subprocess.CompletedProcess:
    """``fedtune run ARGS``: its exit status, stdout and stderr.  In process, an exception that
    escapes the CLI is raised here (a ``child`` process would print it as a traceback)."""
    if child:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-m", "fedtune.cli", "run", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
    from fedtune.cli import main

    out, err, code, before = io.StringIO(), io.StringIO(), 0, os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(["run", *args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
