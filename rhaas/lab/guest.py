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

The pieces: :mod:`rhaas.lab.debs` (packages), :mod:`rhaas.lab.guestroot` (the root file
system and its scripts), :mod:`rhaas.lab.initrd` (overlays); this module is the recipe's
cache and the public entry point :func:`build_guest`.

Images are cached in ``cache_dir/images/<key>/`` where ``<key>`` is derived
from the exact package versions and the recipe version; concurrent builders
are serialised with ``flock`` on ``cache_dir/lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .debs import KERNEL_META, USER_PACKAGES, GuestBuildError, Log, download_debs, resolve_cached, unpack
from .guestroot import (
    DROPBEAR_RUN,
    IMAGE_IDS,
    INITTAB,
    KEXEC_WRAPPER,
    RC_SH,
    STANDBY,
    assemble_root,
    ensure_host_key,
    image_overlay,
    pack_root,
)
from .initrd import FileSpec, append_overlay, atomic_write, authorized_keys_overlay, make_overlay

__all__ = [
    "IMAGE_IDS", "KERNEL_CMDLINE", "KERNEL_META", "RECIPE_VERSION", "STANDBY", "USER_PACKAGES", "FileSpec",
    "GuestBuildError", "GuestImages", "append_overlay", "authorized_keys_overlay", "build_guest",
    "default_cache_dir", "make_overlay",
]

#: Bump when the image layout / scripts change, to invalidate caches.
RECIPE_VERSION = "7"

KERNEL_CMDLINE = "console=ttyS0 quiet panic=5"



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


def default_cache_dir() -> Path:
    env = os.environ.get("RHAAS_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/rhaas/lab").expanduser()



@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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
            kpkg, versions = resolve_cached(cache_dir)
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
                    atomic_write(stamp, str(path.stat().st_mtime_ns).encode())
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
        unpack(debs.values(), tree)
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise GuestBuildError(f"expected one vmlinuz in {kpkg}, got {vmlinuz}")
        kver = vmlinuz[0].name[len("vmlinuz-"):]
        host_key, host_pub = ensure_host_key(cache_dir, tree, log)
        assemble_root(tree, root, kver, host_key, log)
        log("packing initramfs")
        base = pack_root(root)

        build.mkdir(parents=True, exist_ok=True)
        atomic_write(build / "vmlinuz", vmlinuz[0].read_bytes())
        initrds = {}
        for image_id in IMAGE_IDS:
            name = f"initrd-{image_id}.cpio.gz"
            atomic_write(build / name, base + image_overlay(image_id))
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
        atomic_write(build / "manifest.json", json.dumps(manifest, indent=2).encode())
    log(f"built guest in {time.monotonic() - t0:.1f}s: {build}")
    return manifest

