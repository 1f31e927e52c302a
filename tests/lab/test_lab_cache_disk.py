"""The lab VMs' cache disk: images a node holds survive a real kexec, so a repeat deploy moves no bytes.

Each lab VM has a small virtio-blk disk (rhaas/lab/vm.py) that the guest's rc.sh formats on
first use and mounts at the node cache directory /run/rhaas. The checks go through the
lab's own SSH helper (pinned host key) and the root instance's ``rhaas kexec``: after a
deploy and a real jump, the image's files are still there with the same inode, i.e. the
repeat deploy neither uploaded nor fetched them.
"""

from __future__ import annotations

import json

import pytest
from lab_helpers import node_state


def test_a_vm_gets_a_sparse_cache_disk_as_virtio_blk(tmp_path):
    from rhaas.lab.vm import VM, VMConfig, mac_for

    cfg = VMConfig(name="lab-01", node_dir=str(tmp_path / "n"), ssh_port=2222, mac=mac_for("lab-01"),
                   kernel="/k", initrds={"standby": "/a"}, cache_disk_mb=64)
    vm = VM.create(cfg)
    disk = vm._ensure_cache_disk()
    assert disk == vm.cache_disk and disk.stat().st_size == 64 * 1024 * 1024
    assert disk.stat().st_blocks == 0  # sparse: nothing written yet
    disk.write_bytes(b"kept")  # an existing disk is never replaced
    vm._ensure_cache_disk()
    assert disk.read_bytes() == b"kept"
    argv = " ".join(vm.qemu_argv("standby", "n0nce"))
    assert f"-drive file={disk},if=none,id=cache0,format=raw" in argv
    assert "-device virtio-blk-pci,drive=cache0,serial=rhaas-cache" in argv
    none = VM.create(VMConfig(**{**cfg.__dict__, "node_dir": str(tmp_path / "m"), "cache_disk_mb": 0}))
    assert none._ensure_cache_disk() is None and "virtio-blk" not in " ".join(none.qemu_argv("standby", "x"))


def kexec(stack, *args):
    from rhaas.lab.stack import run_rhaas

    proc = run_rhaas(stack.root_home, "kexec", *args, "--json", check=False)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


@pytest.mark.lab
def test_cache_dir_is_the_disk_and_a_repeat_deploy_moves_nothing(lab_stack, timings):
    node = lab_stack.node("lab-01")
    rc, mounts, err = node.run("cat /proc/mounts")
    assert rc == 0, err
    cache = [ln.split() for ln in mounts.splitlines() if ln.split()[1:2] == ["/run/rhaas"]]
    assert cache and cache[-1][0].startswith("/dev/vd") and cache[-1][3].startswith("rw"), mounts

    kernel_sha = json.loads(lab_stack.root("image", "show", "second", "--json").stdout)["kernel"]["sha256"]
    rc, results, err = kexec(lab_stack, "lab-01", "--image", "second")  # first deploy (or already cached)
    assert rc == 0 and results[0]["outcome"] == "ok", err
    rc, first, err = node.run(f"stat -c '%i %Y %s' /run/rhaas/{kernel_sha}")
    assert rc == 0, err  # the kernel is on the disk after the jump that followed it

    before = node_state(node)
    rc, results, err = kexec(lab_stack, "lab-01", "--image", "second")
    assert rc == 0 and results[0]["outcome"] == "ok", err
    r = results[0]
    timings["rhaas kexec, image in the disk cache: stage"] = r["phases"].get("stage", 0.0)
    assert node_state(node)["boot_id"] == r["boot_id"] != before["boot_id"]  # a real jump in between
    rc, again, err = node.run(f"stat -c '%i %Y %s' /run/rhaas/{kernel_sha}")
    assert rc == 0 and again == first, (first, again)  # same inode and mtime: nothing was sent
    if "transfer" in r:  # the pull path's per-node record, once it exists
        assert not r["transfer"].get("bytes"), r["transfer"]
