"""Tab completion through the real generated scripts, in a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from worlds import ROOT, make_root, plain_node, rhaas

from rhaas.cli.completion import SHELLS, completion_script
from rhaas.model import new_node
from rhaas.store import Store

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("shell", SHELLS)
def test_shipped_scripts_match_the_code(shell):
    shipped = (ROOT / "completions" / f"rhaas.{shell}").read_text()
    assert shipped == completion_script(shell), f"completions/rhaas.{shell} drifted: run 'make completions'"
    assert rhaas(ROOT, "completion", shell).stdout == shipped


def bash_complete(home, words: str) -> list[str]:
    """Source completions/rhaas.bash in bash and press TAB after WORDS."""
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    script = f"""
source {ROOT / 'completions' / 'rhaas.bash'}
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
[[ "{words}" == *" " ]] && COMP_WORDS+=("") && COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_rhaas_completion rhaas
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env.update(RHAAS_HOME=str(home), PATH=f"{BIN}:{env.get('PATH', '')}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30,
                         check=False)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


def test_free_completes_leased_nodes_only(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    with Store(rhaas_home).transaction() as tx:
        tx.put_nodes([new_node("gpu-a01", "leased"), new_node("gpu-a02", "leased"), new_node("gpu-b01", "registered")])
    assert bash_complete(rhaas_home, "rhaas free gpu-") == ["gpu-a01", "gpu-a02"]
    assert bash_complete(rhaas_home, "rhaas show gpu-b") == ["gpu-b01"]
    assert bash_complete(rhaas_home, "rhaas li") == ["list"]


def test_kexec_image_completes_image_names(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    with Store(rhaas_home).transaction() as tx:
        tx.put("images", {"name": "standby", "kernel": "/k", "initrd": "/i"})
        tx.put("images", {"name": "render-2026", "kernel": "/k", "initrd": "/i"})
    assert bash_complete(rhaas_home, "rhaas kexec --image re") == ["render-2026"]


def test_lease_completes_upstream_free_nodes(tmp_path, start_serve):
    root, home = tmp_path / "root", tmp_path / "d"
    make_root(root, nodes=[plain_node(i) for i in range(1, 4)],
              users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",))), projects=("p1",))
    served = start_serve(root)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice",
          env={"RHAAS_UPSTREAM_PASSWORD": "pw"}, check=True)
    rhaas(home, "lease", "node-02", check=True)
    assert bash_complete(home, "rhaas lease node-") == ["node-01", "node-03"]
    # answered from the short-lived cache next time, even with the upstream gone
    served.stop()
    assert bash_complete(home, "rhaas lease node-0") == ["node-01", "node-03"]


def test_completion_without_an_instance_is_quiet(rhaas_home):
    assert bash_complete(rhaas_home, "rhaas free ") == []


def test_completion_index_follows_every_write(rhaas_home):
    """The names index the store writes is never stale: it names the inventory it describes."""
    rhaas(rhaas_home, "init", check=True)
    rhaas(rhaas_home, "node", "register", "rack-a1", "--ssh", "root@127.0.0.1", check=True)
    assert bash_complete(rhaas_home, "rhaas show rack-") == ["rack-a1"]
    rhaas(rhaas_home, "node", "register", "rack-a2", "--ssh", "root@127.0.0.2", check=True)
    assert bash_complete(rhaas_home, "rhaas show rack-") == ["rack-a1", "rack-a2"]
    # an index that does not match the inventory (e.g. a copied home) is rebuilt, not trusted
    (rhaas_home / "cache" / "names.json").write_text('{"key": [0, 0, 0], "nodes": [["ghost", null, null]]}')
    assert bash_complete(rhaas_home, "rhaas show ") == ["rack-a1", "rack-a2"]
