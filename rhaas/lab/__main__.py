"""``python -m rhaas.lab up|down|status|build`` -- drive a lab from the shell."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from . import Lab, build_guest, down, status
    from .vm import LabError

    ap = argparse.ArgumentParser(prog="python -m rhaas.lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="start N VMs with their BMCs")
    p.add_argument("dir")
    p.add_argument("-n", type=int, default=1)
    p.add_argument("--firmware-delay", type=float, default=0.0, help="seconds")
    p.add_argument("--cache-dir")
    p.add_argument("--memory", type=int, default=256, help="MiB per VM")
    p = sub.add_parser("down", help="stop every process recorded in DIR/lab.json")
    p.add_argument("dir")
    p = sub.add_parser("status")
    p.add_argument("dir")
    p = sub.add_parser("build", help="build or reuse the guest images")
    p.add_argument("--cache-dir")
    p.add_argument("--authorized-key")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        if args.cmd == "up":
            lab = Lab.up(args.n, args.firmware_delay, args.dir, cache_dir=args.cache_dir,
                         memory_mb=args.memory, log=log)
            print(json.dumps(lab.info, indent=2))
        elif args.cmd == "down":
            print(json.dumps({"stopped": down(args.dir)}))
        elif args.cmd == "status":
            print(json.dumps(status(args.dir), indent=2))
        elif args.cmd == "build":
            print(json.dumps(build_guest(args.cache_dir, args.authorized_key, log=log).to_json(),
                             indent=2))
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
