"""The lab and the simulated node farm are the optional ``rhaas[lab]`` extra.

The product (``rhaas.core``, ``rhaas.adapters``, the ``rhaas`` command) must neither need nor
import asyncssh, ``rhaas.sim`` or ``rhaas.lab``; ``rhaas lab`` without the extra says how to get
it in one line and exits 2. "Without the extra" is a child interpreter in which
``import asyncssh`` fails (``sys.modules['asyncssh'] = None``), as it would if it were not
installed: uninstalling a package from the test venv is not something a test may do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# a child python without asyncssh, then the rhaas command with the given arguments
HIDDEN = ("import sys; sys.modules['asyncssh'] = None; "
          "sys.argv = ['rhaas'] + sys.argv[1:]; from rhaas.cli import main; main()")


def _run(code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RHAAS_DEBUG"}
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_lab_without_the_extra_says_how_to_install_it(tmp_path):
    for args in (["lab", "status", "--dir", str(tmp_path)], ["lab", "up", "--sim", "1", "--dir", str(tmp_path)],
                 ["lab", "down", "--dir", str(tmp_path)]):
        proc = _run(HIDDEN, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "pip install 'rhaas[lab]'" in lines[0]
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def test_lab_is_a_command_with_the_extra(tmp_path):
    proc = _run("import sys; sys.argv = ['rhaas'] + sys.argv[1:]; from rhaas.cli import main; main()",
                "lab", "status", "--dir", str(tmp_path))
    assert "rhaas[lab]" not in proc.stderr
    assert proc.returncode == 1 and "no lab in" in proc.stderr, proc.stderr


def test_the_product_imports_neither_the_lab_nor_asyncssh():
    code = ("import sys; sys.modules['asyncssh'] = None; "
            "import rhaas.core, rhaas.core.kexec, rhaas.adapters, rhaas.cli; "
            "import rhaas.adapters.ssh, rhaas.adapters.bmc, rhaas.adapters.hil; "
            "bad = sorted(m for m, mod in sys.modules.items() if mod is not None and "
            "(m.split('.')[0] in ('asyncssh', 'uvloop') or m.startswith(('rhaas.sim', 'rhaas.lab')))); "
            "print(' '.join(bad))")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_the_extra_is_declared_apart_from_the_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not names & {"asyncssh", "uvloop"}
    lab = " ".join(project["optional-dependencies"]["lab"])
    assert "asyncssh" in lab and "uvloop" in lab
    assert any("rhaas[lab]" in d for d in project["optional-dependencies"]["test"])
