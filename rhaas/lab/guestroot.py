"""The lab guest's root file system, packed as one initramfs.

busybox (init and the applets), kexec, dropbear and sftp-server with their libraries, the
virtio modules in dependency order, one dropbear host key per cache directory, and the
scripts shipped in ``rhaas/lab/scripts`` (init table, ``rc.sh``, the kexec wrapper).  Each
image adds only its id (``/etc/rhaas-image``) on top (:func:`image_overlay`).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from .debs import GuestBuildError, Log, loader, module_order, needed_libs, run_tool, run_unpacked
from .initrd import atomic_write, overlay_bytes

IMAGE_IDS = ("standby", "second")
STANDBY = "standby"

#: Modules to load, roots only; dependencies are resolved with modinfo.
MODULE_ROOTS = ("virtio_pci", "virtio_net", "virtio_rng", "virtio_blk")  # virtio_blk: the cache disk

#: Binaries copied into the image: (path in unpacked tree, path in image).
BINARIES = (
    ("sbin/kexec", "usr/lib/rhaas/kexec"),  # /sbin/kexec is the KEXEC_WRAPPER script
    ("usr/sbin/dropbear", "usr/sbin/dropbear"),
    ("usr/bin/dropbearkey", "usr/bin/dropbearkey"),
    ("usr/lib/openssh/sftp-server", "usr/lib/openssh/sftp-server"),
)

HOST_KEY_IMAGE_PATH = "etc/dropbear/dropbear_ed25519_host_key"
LIBDIR = "usr/lib/x86_64-linux-gnu"


def ensure_host_key(cache_dir: Path, tree: Path | None, log: Log) -> tuple[Path, str]:
    """One dropbear ed25519 host key per cache dir, plus its OpenSSH public line."""
    keydir = cache_dir / "hostkey"
    key = keydir / "dropbear_ed25519_host_key"
    pub = keydir / "host_key.pub"
    if key.exists() and pub.exists():
        return key, pub.read_text().strip()
    if tree is None:
        raise GuestBuildError("host key missing and no unpacked dropbear available")
    keydir.mkdir(parents=True, exist_ok=True)
    os.chmod(keydir, 0o700)
    if not key.exists():
        log("generating dropbear ed25519 host key")
        tmp = keydir / f".key.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        run_unpacked(tree, "usr/bin/dropbearkey", "-t", "ed25519", "-f", str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, key)
    out = run_unpacked(tree, "usr/bin/dropbearkey", "-y", "-f", str(key)).stdout
    line = next((ln.strip() for ln in out.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if not line:
        raise GuestBuildError(f"dropbearkey -y gave no public key: {out!r}")
    line = " ".join(line.split()[:2])  # drop the "root@host" comment
    atomic_write(pub, (line + "\n").encode())
    return key, line


def _script(name: str) -> str:
    """A file shipped in ``rhaas/lab/scripts`` (package data), as text."""
    return resources.files("rhaas.lab").joinpath("scripts", name).read_text(encoding="utf-8")


#: busybox init's table: rc.sh once, then dropbear and a shell on the console, respawned.
INITTAB = _script("inittab")

#: /etc/rc.sh: mounts, virtio modules, hostname and address from the kernel command line
#: (``rhaas.ip=ADDR[,GW]``, ``rhaas.hostname=``), then one ``RHAAS-READY`` line on the console.
RC_SH = _script("rc.sh")

#: dropbear, held back while a ``kexec -e`` is under way (see KEXEC_WRAPPER).
DROPBEAR_RUN = _script("rhaas-dropbear.sh")

#: /sbin/kexec, a wrapper around the real binary (``/usr/lib/rhaas/kexec``).  On a loaded
#: 2-core host an emulated guest can take a while between ``kexec -e`` being asked for and
#: the jump, and its old sshd keeps accepting logins meanwhile: a client polling for the new
#: kernel then authenticates against a kernel that vanishes mid-handshake (on hardware the
#: jump follows at once).  For ``-e``/``--exec`` the wrapper stops the listening dropbear
#: first (it is not respawned while ``/run/rhaas-kexec-firing`` exists), lets sessions
#: already open finish (at most 3 s), then jumps; if the jump fails, dropbear comes back.
#: Everything else goes straight to the real binary.
KEXEC_WRAPPER = _script("kexec-wrapper.sh")

#: root's /etc/profile.
PROFILE = _script("profile")


def assemble_root(tree: Path, root: Path, kver: str, host_key: Path, log: Log) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", LIBDIR, "usr/lib/openssh", "usr/lib/rhaas", "lib",
              "lib64", "lib/modules", "etc/dropbear", "root/.ssh", "proc", "sys", "dev",
              "run", "tmp", "var/log", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "root", 0o700)
    os.chmod(root / "root/.ssh", 0o700)
    os.chmod(root / "tmp", 0o1777)
    os.symlink("../run", root / "var/run")
    os.symlink("../usr/lib/x86_64-linux-gnu", root / "lib/x86_64-linux-gnu")

    # busybox and its applets
    bb = tree / "bin/busybox"
    shutil.copy2(bb, root / "bin/busybox")
    applets = run_tool([str(bb), "--list"]).stdout.split()
    for a in applets:
        if a in ("busybox",) or "/" in a:
            continue
        link = root / "bin" / a
        if not link.exists():
            os.symlink("busybox", link)
    os.symlink("bin/busybox", root / "init")

    # dynamic binaries and their library closure
    libs: set[Path] = set()
    for src, dst in BINARIES:
        s = tree / src
        if not s.exists():
            raise GuestBuildError(f"{src} missing from the unpacked packages")
        shutil.copy2(s, root / dst)
        libs.update(needed_libs(tree, s))
    for lib in sorted(libs):
        real = lib.resolve()
        shutil.copy2(real, root / LIBDIR / lib.name)
    ld = loader(tree).resolve()
    shutil.copy2(ld, root / LIBDIR / "ld-linux-x86-64.so.2")
    os.symlink("../usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
               root / "lib64/ld-linux-x86-64.so.2")
    os.symlink("openssh/sftp-server", root / "usr/lib/sftp-server")

    # modules in dependency order
    order = module_order(tree, kver, MODULE_ROOTS)
    names = []
    for ko in order:
        name = ko.name[: -len(".ko")]
        shutil.copy2(ko, root / "lib/modules" / ko.name)
        names.append(name)
    log("modules: " + " ".join(names))

    etc = root / "etc"
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "shadow": "root:*:19000:0:99999:7:::\n",
        "group": "root:x:0:\n",
        "shells": "/bin/sh\n/bin/ash\n",
        "inittab": INITTAB,
        "profile": PROFILE,
        "hosts": "127.0.0.1 localhost\n",
        "ld.so.conf": "/usr/lib/x86_64-linux-gnu\n",
        "modules.order": "\n".join(names) + "\n",
        "rc.sh": RC_SH,
        "rhaas-image": STANDBY + "\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)
    os.chmod(etc / "rc.sh", 0o755)
    for path, text in (("sbin/kexec", KEXEC_WRAPPER), ("usr/sbin/rhaas-dropbear", DROPBEAR_RUN)):
        (root / path).write_text(text)
        os.chmod(root / path, 0o755)
    os.chmod(etc / "shadow", 0o600)
    (root / "root/.ssh/authorized_keys").write_text("")
    os.chmod(root / "root/.ssh/authorized_keys", 0o600)
    shutil.copyfile(host_key, root / HOST_KEY_IMAGE_PATH)
    os.chmod(root / HOST_KEY_IMAGE_PATH, 0o600)

    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        run_tool([ldconfig, "-r", str(root)])
    except GuestBuildError as e:  # not fatal: the loader's default path finds LIBDIR
        log(f"warning: {e}")


def pack_root(root: Path) -> bytes:
    """``find . | cpio -o -H newc --owner=0:0``, gzipped."""
    names = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for n in sorted(dirnames) + sorted(filenames):
            names.append(os.path.join(rel, n) if rel != "." else "./" + n)
    try:
        proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
                              input=("\n".join(names) + "\n").encode(), cwd=root,
                              capture_output=True, check=True)
    except FileNotFoundError as e:
        raise GuestBuildError("cpio not found (Debian package: cpio)") from e
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(f"cpio failed: {e.stderr.decode()[-2000:]}") from e
    return gzip.compress(proc.stdout, compresslevel=6, mtime=0)


def image_overlay(image_id: str) -> bytes:
    """Per-image part: the image id, and /dev/console (cpio as non-root cannot mknod)."""
    return overlay_bytes({"etc/rhaas-image": image_id + "\n"}, {"dev": 0o755},
                          devices={"dev/console": (0o600, 5, 1)})
