#!/usr/bin/python3 -I
"""The fake ``kexec`` of one netns-farm node (tests/netns_farm.py copies it to the node's bin/kexec).

``kexec -l KERNEL [--initrd=FILE] [--command-line=ARGS]`` checks the files exist, logs the call
and marks a kernel loaded. ``kexec -e`` does what a real jump does to what rhaas can observe:
the node's link goes down for the configured down time, every process of the node's network
namespace except its sshd listener (and this process's own ancestors) is killed, the RAM
cache is emptied, and the boot id (a new uuid) and /proc/cmdline (the loaded line) change.
Python, not sh: it scans /proc for the namespace's processes without a fork per PID.
State lives in files the node has bind-mounted by inode, so they are rewritten in place.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "..", "kexec.json")) as fh:
    CONFIG = json.load(fh)
STATE = CONFIG["state"]


def read(name: str) -> str:
    with open(os.path.join(STATE, name)) as fh:
        return fh.read()


def put(name: str, text: str) -> None:
    with open(os.path.join(STATE, name), "r+") as fh:
        fh.truncate(0)
        fh.write(text)


def load(args: list[str]) -> int:
    kernel = args[1] if len(args) > 1 and not args[1].startswith("-") else ""
    initrd = next((a[len("--initrd="):] for a in args if a.startswith("--initrd=")), None)
    cmdline = next((a[len("--command-line="):] for a in args if a.startswith("--command-line=")), "")
    for path in [kernel] + ([initrd] if initrd is not None else []):
        if not os.path.isfile(path):
            print(f"kexec: cannot open {path!r}", file=sys.stderr)
            return 1
    put("loaded_cmdline", cmdline)
    put("kexec_loaded", "1\n")
    return 0


def kill_node_processes() -> None:
    keep = {os.getpid(), int(read("sshd.pid"))}
    pid = os.getpid()
    while pid > 1:
        with open(f"/proc/{pid}/stat") as fh:
            pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        keep.add(pid)
    mine = os.readlink("/proc/self/ns/net")
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in keep:
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == mine:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def jump() -> int:
    if read("kexec_loaded").strip() != "1":
        print("kexec: no kernel loaded", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    subprocess.run(["/usr/sbin/ip", "link", "set", "eth0", "down"], check=False)
    kill_node_processes()
    for entry in os.listdir(CONFIG["cache"]):
        path = os.path.join(CONFIG["cache"], entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    put("cmdline", read("loaded_cmdline") + "\n")
    put("kexec_loaded", "0\n")
    with open("/proc/sys/kernel/random/uuid") as fh:
        put("boot_id", fh.read())
    time.sleep(max(0.0, CONFIG["down"] - (time.monotonic() - t0)))
    subprocess.run(["/usr/sbin/ip", "link", "set", "eth0", "up"], check=False)
    return 0


def main(args: list[str]) -> int:
    with open(os.path.join(STATE, "kexec.log"), "a") as fh:
        fh.write(json.dumps(args) + "\n")
    if args[:1] == ["-l"]:
        return load(args)
    if args[:1] == ["-e"]:
        return jump()
    print("kexec (fake): only -l KERNEL [--initrd=F] [--command-line=S] and -e", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
