"""Stop a server in the middle of writing a file, so a test can kill -9 it exactly there.

Every file sdstudio must never leave half-written (output images, LoRA files, training states, settings) is
written to a temporary file and then given its name: moved into place with ``os.replace``, or, for output
pictures, hard-linked with ``os.link`` (which claims the name atomically). Run as the server command
(``python tests/fault_hold.py --hold-dir D --hold-write SUFFIX:N -- <sdstudio serve flags>``), this file makes
the N-th such naming of a file ending in ``SUFFIX`` the moment the server dies: the temporary file is first cut
to half its length (the write was under way when the power went), ``D/held`` gets the destination's path, and
the process waits there to be killed. Only this process is affected; the server is otherwise the one
``sdstudio serve`` builds from those flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def hold_on_write(folder: Path, suffix: str, nth: int) -> None:
    seen = [0]

    def holding(real):
        def name(src, dst, *args, **kwargs):
            if str(dst).endswith(suffix):
                seen[0] += 1
                if seen[0] == nth:
                    os.truncate(src, os.path.getsize(src) // 2)
                    (folder / "held").write_text(f"{dst}\n{src}")
                    while True:
                        time.sleep(1)
            return real(src, dst, *args, **kwargs)
        return name

    os.replace = holding(os.replace)
    os.link = holding(os.link)


def main(argv: list[str]) -> None:
    import uvicorn

    from sdstudio.cli import build_parser
    from sdstudio.server import create_app

    parser = argparse.ArgumentParser()
    parser.add_argument("--hold-dir", type=Path, required=True)
    parser.add_argument("--hold-write", required=True, help="SUFFIX:N")
    own, rest = parser.parse_known_args(argv)
    suffix, nth = own.hold_write.rsplit(":", 1)
    hold_on_write(own.hold_dir, suffix, int(nth))
    args = build_parser().parse_args(["serve", *[a for a in rest if a != "--"]])
    uvicorn.run(create_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
