"""Build a tiny kexec-capable guest (kernel + initramfs) from Debian packages.

Everything comes from Debian packages fetched with ``apt-get download`` and
unpacked with ``dpkg -x``; nothing is installed on the host and no root
privileges are needed for the build itself.

The result is one cloud kernel and two initramfs images that differ only in
``/etc/rhaas-image`` (``standby`` and ``second``).  Both contain busybox,
kexec-tools, dropbear (key logins only) with an SFTP server, and the virtio
modules needed for networking.  One dropbear ed25519 host key is generated per
cache directory and baked into every image, so a node keeps its host key
across kexec and reset.

Images are cached in ``cache_dir/images/<key>/`` where ``<key>`` is derived
from the exact package versions and the recipe version; concurrent builders
are serialised with ``flock`` on ``cache_dir/lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Union

from rhaas.core.overlay import CpioEntry, write_newc

from .vm import LabError

#: Bump when the image layout / scripts change, to invalidate caches.
RECIPE_VERSION = "5"

IMAGE_IDS = ("standby", "second")
STANDBY = "standby"

KERNEL_META = "linux-image-cloud-amd64"
KERNEL_CMDLINE = "console=ttyS0 quiet panic=5"

#: Packages besides the kernel.  The library packages are what kexec
#: (via libxenctrl), dropbear and friends actually link against; the exact
#: closure is resolved with the unpacked dynamic loader at build time.
USER_PACKAGES = (
    "busybox-static",
    "kexec-tools",
    "dropbear-bin",
    "openssh-sftp-server",
    "libc6",
    # kexec -> libxenctrl and its dependencies
    "libxenmisc4.17",
    "libxentoollog1",
    "libxencall1",
    "libxenevtchn1",
    "libxengnttab1",
    "libxenforeignmemory1",
    "libxendevicemodel1",
    "libxentoolcore1",
    # dropbear
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "zlib1g",
    "libcrypt1",
)

#: Modules to load, roots only; dependencies are resolved with modinfo.
MODULE_ROOTS = ("virtio_pci", "virtio_net", "virtio_rng")

#: Binaries copied into the image: (path in unpacked tree, path in image).
BINARIES = (
    ("sbin/kexec", "usr/lib/rhaas/kexec"),  # /sbin/kexec is the KEXEC_WRAPPER script
    ("usr/sbin/dropbear", "usr/sbin/dropbear"),
    ("usr/bin/dropbearkey", "usr/bin/dropbearkey"),
    ("usr/lib/openssh/sftp-server", "usr/lib/openssh/sftp-server"),
)

HOST_KEY_IMAGE_PATH = "etc/dropbear/dropbear_ed25519_host_key"
LIBDIR = "usr/lib/x86_64-linux-gnu"

Log = Callable[[str], None]


class GuestBuildError(LabError):
    """Raised when the guest image cannot be built."""


@dataclasses.dataclass(frozen=True)
class GuestImages:
    """Paths of a built guest.

    ``initrds`` maps image id -> initramfs.  If an authorized key was given
    these include it; ``base_initrds`` are the same images without any
    ``authorized_keys`` (for callers that add their own overlay).
    """

    kernel: Path
    initrds: dict[str, Path]
    base_initrds: dict[str, Path]
    host_key_pub: str  #: OpenSSH public key line, e.g. "ssh-ed25519 AAAA..."
    host_key_file: Path  #: dropbear-format private host key (in the cache)
    kernel_version: str
    packages: dict[str, str]
    build_dir: Path

    def cmdline(self, nonce: str | None = None, extra: str = "") -> str:
        """Kernel command line for these images (optionally with a nonce)."""
        parts = [KERNEL_CMDLINE]
        if nonce:
            parts.append(f"rhaas.nonce={nonce}")
        if extra:
            parts.append(extra)
        return " ".join(parts)

    def to_json(self) -> dict:
        return {
            "kernel": str(self.kernel),
            "initrds": {k: str(v) for k, v in self.initrds.items()},
            "base_initrds": {k: str(v) for k, v in self.base_initrds.items()},
            "host_key_pub": self.host_key_pub,
            "host_key_file": str(self.host_key_file),
            "kernel_version": self.kernel_version,
            "packages": dict(self.packages),
            "build_dir": str(self.build_dir),
        }


# ---------------------------------------------------------------------------
# overlays (the newc writer is rhaas.core.overlay's)
# ---------------------------------------------------------------------------

FileSpec = Union[bytes, str, "tuple[bytes | str, int]"]


def _overlay_bytes(files: Mapping[str, FileSpec], dirs: Mapping[str, int] | None,
                   devices: Mapping[str, tuple[int, int, int]] | None = None) -> bytes:
    dirs = {k.strip("/"): v for k, v in (dirs or {}).items()}
    entries: list[CpioEntry] = []
    seen_dirs: set[str] = set()

    def add_parents(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen_dirs:
                seen_dirs.add(d)
                entries.append(CpioEntry(d, stat.S_IFDIR | dirs.get(d, 0o755)))

    for d in sorted(dirs):
        add_parents(d + "/x")
    for path, spec in files.items():
        path = path.strip("/")
        if isinstance(spec, tuple):
            data, mode = spec
        else:
            data, mode = spec, 0o644
        if isinstance(data, str):
            data = data.encode()
        add_parents(path)
        entries.append(CpioEntry(path, stat.S_IFREG | mode, data))
    for path, (mode, major, minor) in (devices or {}).items():
        path = path.strip("/")
        add_parents(path)
        entries.append(CpioEntry(path, stat.S_IFCHR | mode, b"", (major, minor)))
    return gzip.compress(write_newc(entries), compresslevel=6, mtime=0)


def make_overlay(files: Mapping[str, FileSpec], out: Union[str, os.PathLike, BinaryIO, None] = None,
                 *, dirs: Mapping[str, int] | None = None) -> bytes:
    """Write a gzipped newc cpio archive holding ``files`` and return its bytes.

    ``files`` maps a path inside the guest (``"root/.ssh/authorized_keys"``)
    to its content, or to ``(content, mode)``; the default mode is 0644.
    Parent directories are emitted automatically with mode 0755 unless
    ``dirs`` gives a mode (e.g. ``{"root/.ssh": 0o700}``).  Linux accepts such
    an archive appended to an initramfs (``cat base overlay > new``); later
    entries replace earlier ones.  ``out`` may be a path or a binary file.
    """
    data = _overlay_bytes(files, dirs)
    if out is not None:
        if hasattr(out, "write"):
            out.write(data)  # type: ignore[union-attr]
        else:
            _atomic_write(Path(out), data)
    return data


def authorized_keys_overlay(pubkey: str | bytes) -> bytes:
    """Overlay that installs ``pubkey`` as root's only authorized key."""
    if isinstance(pubkey, bytes):
        pubkey = pubkey.decode()
    return _overlay_bytes(
        {"root/.ssh/authorized_keys": (pubkey.strip() + "\n", 0o600)},
        {"root": 0o700, "root/.ssh": 0o700})


def append_overlay(base: Path, overlay: bytes, out: Path) -> Path:
    """Write ``base`` + ``overlay`` to ``out`` atomically."""
    _atomic_write(out, base.read_bytes() + overlay)
    return out


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def default_cache_dir() -> Path:
    env = os.environ.get("RHAAS_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/rhaas/lab").expanduser()


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} not found; install the Debian tools (apt, dpkg, cpio)") from e
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr.strip()[-2000:]}") from e


def resolve_kernel_package() -> str:
    """Current ``linux-image-6.1.0-NN-cloud-amd64`` from the meta package."""
    out = _run(["apt-cache", "depends", KERNEL_META]).stdout
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not m:
        raise GuestBuildError(f"cannot find the kernel package behind {KERNEL_META}: {out!r}")
    return m.group(1)


def resolve_versions(packages: Iterable[str]) -> dict[str, str]:
    """Candidate version of each package, via apt-cache."""
    packages = list(packages)
    out = _run(["apt-cache", "show", "--no-all-versions", *packages]).stdout
    found: dict[str, str] = {}
    pkg = None
    for line in out.splitlines():
        if line.startswith("Package:"):
            pkg = line.split(":", 1)[1].strip()
        elif line.startswith("Version:") and pkg and pkg not in found:
            found[pkg] = line.split(":", 1)[1].strip()
    missing = [p for p in packages if p not in found]
    if missing:
        raise GuestBuildError(f"apt-cache knows no version of: {', '.join(missing)}"
                              " (run apt-get update?)")
    return found


def _apt_stamp() -> str:
    """Changes whenever apt's view of the archive may have changed."""
    parts = []
    for d in ("/var/lib/apt/lists", "/etc/apt", "/etc/apt/sources.list.d",
              "/etc/apt/preferences.d"):
        with contextlib.suppress(OSError):
            parts.append(f"{d}:{os.stat(d).st_mtime_ns}")
    with contextlib.suppress(OSError):
        for e in os.scandir("/var/lib/apt/lists"):
            parts.append(f"{e.name}:{e.stat().st_mtime_ns}")
    parts.append(" ".join(USER_PACKAGES) + KERNEL_META)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _resolve_cached(cache_dir: Path) -> tuple[str, dict[str, str]]:
    """Kernel package + versions; memoised per apt state (apt-cache is ~1 s a call)."""
    memo = cache_dir / "resolved.json"
    stamp = _apt_stamp()
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(memo.read_text())
        if data["stamp"] == stamp:
            return data["kernel_package"], data["versions"]
    kpkg = resolve_kernel_package()
    versions = resolve_versions([kpkg, *USER_PACKAGES])
    _atomic_write(memo, json.dumps({"stamp": stamp, "kernel_package": kpkg,
                                    "versions": versions}, indent=1).encode())
    return kpkg, versions


def _deb_name(pkg: str, version: str) -> str:
    return f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"


def download_debs(versions: Mapping[str, str], debs_dir: Path, log: Log) -> dict[str, Path]:
    """``apt-get download`` every pkg=version not already in ``debs_dir``."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    result = {p: debs_dir / _deb_name(p, v) for p, v in versions.items()}
    missing = [p for p, path in result.items() if not path.exists()]
    if missing:
        log(f"downloading {len(missing)} packages")
        with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".dl-") as tmp:
            os.chmod(tmp, 0o755)  # let apt's _apt user write if we run as root
            _run(["apt-get", "download", "-q", *(f"{p}={versions[p]}" for p in missing)], cwd=tmp)
            got = os.listdir(tmp)
            for p in missing:
                prefix = p + "_"
                cands = [f for f in got if f.startswith(prefix) and f.endswith(".deb")]
                if len(cands) != 1:
                    raise GuestBuildError(f"apt-get download gave {cands} for {p}")
                os.replace(os.path.join(tmp, cands[0]), result[p])
    return result


def _unpack(debs: Iterable[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(root)])


def _loader(tree: Path) -> Path:
    for cand in ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                 "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        p = tree / cand
        if p.exists():
            return p
    raise GuestBuildError("ld-linux-x86-64.so.2 not found in unpacked libc6")


def _libpath(tree: Path) -> str:
    return ":".join(str(tree / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))


def _run_unpacked(tree: Path, binary: str, *args: str) -> subprocess.CompletedProcess:
    """Run a dynamically linked binary from the unpacked tree with its own libc."""
    return _run([str(_loader(tree)), "--library-path", _libpath(tree), str(tree / binary), *args])


def _needed_libs(tree: Path, binary: Path) -> list[Path]:
    out = _run([str(_loader(tree)), "--library-path", _libpath(tree), "--list", str(binary)]).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise GuestBuildError(f"{binary.name}: unresolved library: {line}")
        m = re.match(r"(\S+) => (\S+) \(", line)
        if m and not m.group(1).startswith("linux-vdso"):
            libs.append(Path(m.group(2)))
    return libs


def _module_order(tree: Path, kver: str, roots: Iterable[str]) -> list[Path]:
    """Depth-first dependency order of ``roots`` using ``modinfo -F depends``."""
    moddir = tree / "lib/modules" / kver
    index: dict[str, Path] = {}
    for ko in moddir.rglob("*.ko*"):
        name = ko.name.split(".ko")[0].replace("-", "_")
        index.setdefault(name, ko)
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().splitlines():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))
    order: list[Path] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in stack:
            raise GuestBuildError(f"module dependency cycle: {stack + (name,)}")
        ko = index.get(name)
        if ko is None:
            raise GuestBuildError(f"module {name} not found in {moddir}")
        deps = _run(["modinfo", "-F", "depends", str(ko)]).stdout.strip()
        for dep in filter(None, deps.split(",")):
            visit(dep, stack + (name,))
        done.add(name)
        order.append(ko)

    for r in roots:
        visit(r, ())
    for ko in order:
        if ko.name.endswith((".ko.xz", ".ko.zst", ".ko.gz")):
            raise GuestBuildError(f"compressed module {ko.name}: busybox insmod cannot load it")
    return order


# ---------------------------------------------------------------------------
# host key
# ---------------------------------------------------------------------------

def _ensure_host_key(cache_dir: Path, tree: Path | None, log: Log) -> tuple[Path, str]:
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
        _run_unpacked(tree, "usr/bin/dropbearkey", "-t", "ed25519", "-f", str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, key)
    out = _run_unpacked(tree, "usr/bin/dropbearkey", "-y", "-f", str(key)).stdout
    line = next((ln.strip() for ln in out.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if not line:
        raise GuestBuildError(f"dropbearkey -y gave no public key: {out!r}")
    line = " ".join(line.split()[:2])  # drop the "root@host" comment
    _atomic_write(pub, (line + "\n").encode())
    return key, line


# ---------------------------------------------------------------------------
# image contents
# ---------------------------------------------------------------------------

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


def _assemble_root(tree: Path, root: Path, kver: str, host_key: Path, log: Log) -> None:
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
    applets = _run([str(bb), "--list"]).stdout.split()
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
        libs.update(_needed_libs(tree, s))
    for lib in sorted(libs):
        real = lib.resolve()
        shutil.copy2(real, root / LIBDIR / lib.name)
    ld = _loader(tree).resolve()
    shutil.copy2(ld, root / LIBDIR / "ld-linux-x86-64.so.2")
    os.symlink("../usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
               root / "lib64/ld-linux-x86-64.so.2")
    os.symlink("openssh/sftp-server", root / "usr/lib/sftp-server")

    # modules in dependency order
    order = _module_order(tree, kver, MODULE_ROOTS)
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
        _run([ldconfig, "-r", str(root)])
    except GuestBuildError as e:  # not fatal: the loader's default path finds LIBDIR
        log(f"warning: {e}")


def _pack(root: Path) -> bytes:
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


def _image_overlay(image_id: str) -> bytes:
    """Per-image part: the image id, and /dev/console (cpio as non-root cannot mknod)."""
    return _overlay_bytes({"etc/rhaas-image": image_id + "\n"}, {"dev": 0o755},
                          devices={"dev/console": (0o600, 5, 1)})


# ---------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------

def _cache_key(versions: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE_VERSION}\n".encode())
    h.update(RC_SH.encode())
    h.update(INITTAB.encode())
    h.update(KEXEC_WRAPPER.encode())
    h.update(DROPBEAR_RUN.encode())
    for p in sorted(versions):
        h.update(f"{p}={versions[p]}\n".encode())
    return h.hexdigest()[:16]


def _load_manifest(d: Path, host_key_pub: str | None) -> dict | None:
    mf = d / "manifest.json"
    try:
        data = json.loads(mf.read_text())
    except (OSError, ValueError):
        return None
    if host_key_pub is not None and data.get("host_key_pub") != host_key_pub:
        return None
    if not all((d / f).exists() for f in [data["kernel"], *data["initrds"].values()]):
        return None
    return data


def _newest_build(cache_dir: Path) -> Path | None:
    builds = [p.parent for p in (cache_dir / "images").glob("*/manifest.json")]
    return max(builds, key=lambda p: p.stat().st_mtime) if builds else None


def build_guest(cache_dir: str | os.PathLike | None = None,
                authorized_key_path: str | os.PathLike | None = None,
                *, out_dir: str | os.PathLike | None = None,
                log: Log | None = None) -> GuestImages:
    """Build (or reuse from the cache) the kernel and the two initramfs images.

    If ``authorized_key_path`` is given, the returned ``initrds`` are the base
    images with an overlay making that key root's ``authorized_keys``; they are
    written to ``out_dir`` (default: a sub-directory of the cached build keyed
    by the key's hash).
    """
    log = log or (lambda msg: None)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)

    with _locked(cache_dir / "lock"):
        try:
            kpkg, versions = _resolve_cached(cache_dir)
        except GuestBuildError as e:
            # offline / no apt lists: fall back to the newest complete build
            fallback = _newest_build(cache_dir)
            if fallback is None:
                raise
            log(f"apt-cache failed ({e}); reusing {fallback}")
            build = fallback
            manifest = _load_manifest(build, None)
            if manifest is None:
                raise
            versions = manifest["packages"]
        else:
            build = cache_dir / "images" / _cache_key(versions)
            hk = cache_dir / "hostkey" / "host_key.pub"
            manifest = _load_manifest(build, hk.read_text().strip() if hk.exists() else "")
            if manifest is None:
                manifest = _build(cache_dir, build, kpkg, versions, log)
            else:
                log(f"reusing cached guest {build}")

        host_key = cache_dir / "hostkey" / "dropbear_ed25519_host_key"
        kernel = build / manifest["kernel"]
        base = {k: build / v for k, v in manifest["initrds"].items()}
        initrds = dict(base)
        if authorized_key_path is not None:
            pub = Path(authorized_key_path).read_text().strip()
            if not pub:
                raise GuestBuildError(f"{authorized_key_path} is empty")
            tag = hashlib.sha256(pub.encode()).hexdigest()[:16]
            dest = Path(out_dir) if out_dir else build / f"keyed-{tag}"
            ov = authorized_keys_overlay(pub)
            for image_id, path in base.items():
                target = dest / f"initrd-{image_id}.cpio.gz"
                stamp = dest / f".initrd-{image_id}.{tag}"
                if not (target.exists() and stamp.exists()
                        and stamp.read_text() == str(path.stat().st_mtime_ns)):
                    append_overlay(path, ov, target)
                    _atomic_write(stamp, str(path.stat().st_mtime_ns).encode())
                initrds[image_id] = target

        return GuestImages(
            kernel=kernel, initrds=initrds, base_initrds=base,
            host_key_pub=manifest["host_key_pub"], host_key_file=host_key,
            kernel_version=manifest["kernel_version"], packages=dict(versions),
            build_dir=build)


def _build(cache_dir: Path, build: Path, kpkg: str, versions: Mapping[str, str],
           log: Log) -> dict:
    t0 = time.monotonic()
    debs = download_debs(versions, cache_dir / "debs", log)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        tree = Path(tmp) / "unpacked"
        root = Path(tmp) / "root"
        log("unpacking packages")
        _unpack(debs.values(), tree)
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise GuestBuildError(f"expected one vmlinuz in {kpkg}, got {vmlinuz}")
        kver = vmlinuz[0].name[len("vmlinuz-"):]
        host_key, host_pub = _ensure_host_key(cache_dir, tree, log)
        _assemble_root(tree, root, kver, host_key, log)
        log("packing initramfs")
        base = _pack(root)

        build.mkdir(parents=True, exist_ok=True)
        _atomic_write(build / "vmlinuz", vmlinuz[0].read_bytes())
        initrds = {}
        for image_id in IMAGE_IDS:
            name = f"initrd-{image_id}.cpio.gz"
            _atomic_write(build / name, base + _image_overlay(image_id))
            initrds[image_id] = name
        manifest = {
            "kernel": "vmlinuz",
            "kernel_version": kver,
            "initrds": initrds,
            "host_key_pub": host_pub,
            "packages": dict(versions),
            "recipe": RECIPE_VERSION,
            "built_at": time.time(),
            "build_seconds": round(time.monotonic() - t0, 2),
        }
        _atomic_write(build / "manifest.json", json.dumps(manifest, indent=2).encode())
    log(f"built guest in {time.monotonic() - t0:.1f}s: {build}")
    return manifest
