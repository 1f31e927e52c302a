"""Debian packages for the lab guest: versions, ``apt-get download``, ``dpkg -x``, and what the
unpacked binaries (their shared libraries) and kernel modules (their dependencies) need.

Nothing is installed on the host and no root privileges are needed: packages are fetched
into the cache and unpacked into a scratch tree.  Libraries are found by asking the
unpacked dynamic loader (``--list``), modules' dependencies with ``modinfo``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .initrd import atomic_write
from .vm import LabError

KERNEL_META = "linux-image-cloud-amd64"

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

Log = Callable[[str], None]


class GuestBuildError(LabError):
    """Raised when the guest image cannot be built."""


def run_tool(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} not found; install the Debian tools (apt, dpkg, cpio)") from e
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr.strip()[-2000:]}") from e


def resolve_kernel_package() -> str:
    """Current ``linux-image-6.1.0-NN-cloud-amd64`` from the meta package."""
    out = run_tool(["apt-cache", "depends", KERNEL_META]).stdout
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not m:
        raise GuestBuildError(f"cannot find the kernel package behind {KERNEL_META}: {out!r}")
    return m.group(1)


def resolve_versions(packages: Iterable[str]) -> dict[str, str]:
    """Candidate version of each package, via apt-cache."""
    packages = list(packages)
    out = run_tool(["apt-cache", "show", "--no-all-versions", *packages]).stdout
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


def resolve_cached(cache_dir: Path) -> tuple[str, dict[str, str]]:
    """Kernel package + versions; memoised per apt state (apt-cache is ~1 s a call)."""
    memo = cache_dir / "resolved.json"
    stamp = _apt_stamp()
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(memo.read_text())
        if data["stamp"] == stamp:
            return data["kernel_package"], data["versions"]
    kpkg = resolve_kernel_package()
    versions = resolve_versions([kpkg, *USER_PACKAGES])
    atomic_write(memo, json.dumps({"stamp": stamp, "kernel_package": kpkg,
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
            run_tool(["apt-get", "download", "-q", *(f"{p}={versions[p]}" for p in missing)], cwd=tmp)
            got = os.listdir(tmp)
            for p in missing:
                prefix = p + "_"
                cands = [f for f in got if f.startswith(prefix) and f.endswith(".deb")]
                if len(cands) != 1:
                    raise GuestBuildError(f"apt-get download gave {cands} for {p}")
                os.replace(os.path.join(tmp, cands[0]), result[p])
    return result


def unpack(debs: Iterable[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        run_tool(["dpkg", "-x", str(deb), str(root)])


def loader(tree: Path) -> Path:
    for cand in ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                 "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        p = tree / cand
        if p.exists():
            return p
    raise GuestBuildError("ld-linux-x86-64.so.2 not found in unpacked libc6")


def _libpath(tree: Path) -> str:
    return ":".join(str(tree / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))


def run_unpacked(tree: Path, binary: str, *args: str) -> subprocess.CompletedProcess:
    """Run a dynamically linked binary from the unpacked tree with its own libc."""
    return run_tool([str(loader(tree)), "--library-path", _libpath(tree), str(tree / binary), *args])


def needed_libs(tree: Path, binary: Path) -> list[Path]:
    out = run_tool([str(loader(tree)), "--library-path", _libpath(tree), "--list", str(binary)]).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise GuestBuildError(f"{binary.name}: unresolved library: {line}")
        m = re.match(r"(\S+) => (\S+) \(", line)
        if m and not m.group(1).startswith("linux-vdso"):
            libs.append(Path(m.group(2)))
    return libs


def module_order(tree: Path, kver: str, roots: Iterable[str]) -> list[Path]:
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
        deps = run_tool(["modinfo", "-F", "depends", str(ko)]).stdout.strip()
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
