"""One guest connection to the run's image origin: QEMU's ``guestfwd=...-cmd:`` runs this per connection.

    python3 blobrelay.py PORT

QEMU's user networking hands the guest's TCP connection (to 10.0.2.100:80) to this process as
its stdin/stdout (one socket); we connect to ``127.0.0.1:PORT``, where ``rhaas kexec`` listens
for the run (``blob-listen``), and copy bytes both ways until both sides are done. Why a
``cmd:`` relay and not ``guestfwd=...-tcp:127.0.0.1:PORT``: a chardev target is one stream
opened once when QEMU starts (no run listens then, and every guest connection would share
it); a command runs once per connection. Standard library only, loopback only: no run
listening means the guest's connection closes at once and the node falls back to SFTP.
Every wait is bounded (connect 5 s, 120 s without a byte either way).
"""

import os
import socket
import sys
import threading

IDLE = 120.0


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(262144)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or not 0 < int(sys.argv[1]) < 65536:
        print("usage: blobrelay.py PORT", file=sys.stderr)
        return 2
    guest = socket.socket(fileno=os.dup(0))
    guest.settimeout(IDLE)
    try:
        host = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5.0)
    except OSError:
        return 1  # no run listens: closing tells the guest at once
    host.settimeout(IDLE)
    up = threading.Thread(target=pump, args=(guest, host), daemon=True)
    up.start()
    pump(host, guest)
    up.join(IDLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
