"""Images: a named kernel + initrd + kernel arguments, recorded in the inventory.

An image record holds absolute paths, sizes, modification times and sha256 digests. The
digest names the file in each node's cache (``/run/rhaas/<sha256>``), so a node that already
holds the bytes is never sent them again. Before a kexec the files are checked against the
record: a file that changed since ``rhaas image add`` is refused rather than silently sent.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rhaas.errors import RhaasError, UsageError
from rhaas.model import check_name

TABLE = "images"
CHUNK = 1 << 20


class ImageError(RhaasError):
    """An image is missing, or its files no longer match the record."""


@dataclass(frozen=True)
class ImageFile:
    path: str
    size: int
    sha256: str
    mtime_ns: int = 0

    def doc(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_doc(cls, d: dict) -> ImageFile:
        return cls(d["path"], int(d["size"]), d["sha256"], int(d.get("mtime_ns", 0)))


@dataclass(frozen=True)
class Image:
    name: str
    kernel: ImageFile
    initrd: ImageFile
    append: str = ""

    def doc(self) -> dict:
        return {
            "name": self.name,
            "kernel": self.kernel.doc(),
            "initrd": self.initrd.doc(),
            "append": self.append,
        }

    @classmethod
    def from_doc(cls, d: dict) -> Image:
        return cls(d["name"], ImageFile.from_doc(d["kernel"]), ImageFile.from_doc(d["initrd"]), d.get("append") or "")


def check_append(append: str | None) -> str:
    """Kernel arguments pass through byte for byte; only line breaks and NUL are refused.

    A newline would end the remote command line and NUL cannot be passed in argv; anything
    else (quotes, ``;``, ``$()``) is quoted for the remote shell and arrives intact.
    """
    append = append or ""
    if "\n" in append or "\r" in append or "\0" in append:
        raise UsageError("--append must not contain line breaks or NUL bytes")
    return append


def file_sha256(path: str | os.PathLike):
    """A sha256 hash object fed with the file (read in 1 MiB chunks); ``.copy()`` it to extend."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h


def describe_file(path: str | os.PathLike, what: str = "file") -> ImageFile:
    """Absolute path, size, mtime and sha256 of a local file."""
    p = Path(path).expanduser()
    try:
        p = p.resolve(strict=True)
        st = p.stat()
        if not p.is_file():
            raise UsageError(f"{what} {path} is not a regular file")
        h = file_sha256(p)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise UsageError(f"{what} {path} is not readable") from None
    return ImageFile(str(p), st.st_size, h.hexdigest(), st.st_mtime_ns)


def make_image(name: str, kernel: str, initrd: str, append: str | None = "") -> Image:
    """Describe an image from local files (used by ``image add`` and ad-hoc ``kexec --kernel``)."""
    check_name(name, "image name")
    return Image(name, describe_file(kernel, "kernel"), describe_file(initrd, "initrd"), check_append(append))


def add_image(store, image: Image, replace: bool = False) -> dict:
    """Record ``image``; refuse to overwrite an existing one unless ``replace``."""
    doc = dict(image.doc(), added=time.time())
    with store.transaction() as tx:
        if tx.get(TABLE, image.name) is not None and not replace:
            raise UsageError(f"image {image.name} exists; use --replace to overwrite it")
        tx.put(TABLE, doc)
        tx.event("image-add", None, "ok", image=image.name, kernel=image.kernel.sha256, initrd=image.initrd.sha256)
    return doc


def list_images(snapshot) -> list[dict]:
    return snapshot.all(TABLE)


def get_image(snapshot, name: str) -> Image:
    check_name(name, "image name")
    doc = snapshot.get(TABLE, name)
    if doc is None:
        raise ImageError(f"no image named {name}; see 'rhaas image list'")
    return Image.from_doc(doc)


def remove_images(store, names: list[str], standby: str | None = None) -> list[str]:
    """Remove images by name in one write; the standby image cannot be removed."""
    for name in names:
        check_name(name, "image name")
        if standby and name == standby:
            raise UsageError(f"image {name} is the standby image; change the 'standby-image' setting first")
    with store.transaction() as tx:
        missing = [n for n in names if tx.get(TABLE, n) is None]
        if missing:
            raise ImageError(f"no image named {', '.join(missing)}")
        for name in names:
            tx.remove(TABLE, name)
            tx.event("image-rm", None, "ok", image=name)
    return names


def check_files(image: Image) -> Image:
    """Make sure the local files still hold the recorded bytes before sending them anywhere.

    Size and mtime unchanged means unchanged (no re-hash); otherwise the file is hashed again
    and must give the recorded digest.
    """
    for what, f in (("kernel", image.kernel), ("initrd", image.initrd)):
        try:
            st = os.stat(f.path)
        except OSError as exc:
            raise ImageError(f"image {image.name}: {what} {f.path}: {exc.strerror}") from None
        if st.st_size == f.size and st.st_mtime_ns == f.mtime_ns:
            continue
        now = describe_file(f.path, what)
        if now.sha256 != f.sha256:
            raise ImageError(
                f"image {image.name}: {what} {f.path} changed since it was added; "
                f"run 'rhaas image add {image.name} --replace ...' again"
            )
    return image
