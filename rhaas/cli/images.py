"""`rhaas image`: parse, call rhaas.core.images, render."""

from __future__ import annotations

import click

from rhaas.cli.common import App, emit_json, fail_on, json_option, pass_app
from rhaas.cli.complete import complete_images
from rhaas.cli.output import table
from rhaas.errors import RhaasError


@click.group()
def image():
    """Manage kernel+initrd images (what `rhaas kexec --image` boots).

    \b
    Examples:
      rhaas image add debian --kernel ./vmlinuz --initrd ./initrd.gz --append "console=ttyS0 quiet"
      rhaas image list
      rhaas image show debian --json
      rhaas config set standby-image debian
    """


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@image.command("add")
@click.argument("name")
@click.option("--kernel", required=True, metavar="PATH", help="The kernel image (bzImage).")
@click.option("--initrd", required=True, metavar="PATH", help="The initramfs.")
@click.option("--append", default="", metavar="ARGS", help="Kernel command line for this image.")
@click.option("--replace", is_flag=True, help="Overwrite an image of the same name.")
@json_option
@pass_app
def image_add(app: App, name: str, kernel: str, initrd: str, append: str, replace: bool, as_json: bool):
    """Record an image: absolute paths, sizes and sha256 of its kernel and initrd.

    The files stay where they are; rhaas refuses to send them if they change later.
    """
    from rhaas.core import images

    try:
        img = images.make_image(name, kernel, initrd, append)
        doc = images.add_image(app.store, img, replace=replace)
    except RhaasError as exc:
        raise fail_on(exc) from None
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"image {name}: kernel {img.kernel.sha256[:12]} ({_size(img.kernel.size)}), "
                   f"initrd {img.initrd.sha256[:12]} ({_size(img.initrd.size)})")


@image.command("list")
@json_option
@pass_app
def image_list(app: App, as_json: bool):
    """List images."""
    from rhaas.core import images

    try:
        docs = images.list_images(app.snapshot())
        standby = app.setting("standby-image")
    except RhaasError as exc:
        raise fail_on(exc) from None
    if as_json:
        emit_json([{**d, "standby": d["name"] == standby} for d in docs])
        return
    rows = [
        [
            d["name"] + (" (standby)" if d["name"] == standby else ""),
            d["kernel"]["path"],
            _size(d["kernel"]["size"]),
            d["initrd"]["path"],
            _size(d["initrd"]["size"]),
            d.get("append") or "",
        ]
        for d in docs
    ]
    table(["name", "kernel", "kernel size", "initrd", "initrd size", "append"], rows)


@image.command("show")
@click.argument("name", shell_complete=complete_images)
@json_option
@pass_app
def image_show(app: App, name: str, as_json: bool):
    """Show one image."""
    from rhaas.core import images

    try:
        img = images.get_image(app.snapshot(), name)
        doc = app.snapshot().get(images.TABLE, name)
    except RhaasError as exc:
        raise fail_on(exc) from None
    if as_json:
        emit_json(doc)
        return
    click.echo(f"name\t{img.name}")
    for what, f in (("kernel", img.kernel), ("initrd", img.initrd)):
        click.echo(f"{what}\t{f.path}\t{f.size}\tsha256:{f.sha256}")
    click.echo(f"append\t{img.append}")


@image.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...", shell_complete=complete_images)
@pass_app
def image_rm(app: App, names: tuple[str, ...]):
    """Remove images from the inventory (their files are left alone)."""
    from rhaas.core import images

    try:
        images.remove_images(app.store, list(names), standby=app.setting("standby-image"))
    except RhaasError as exc:
        raise fail_on(exc) from None
    click.echo(f"removed {', '.join(names)}", err=True)


# -- rhaas kexec ----------------------------------------------------------------------------------
