"""Stop a server in the middle of writing a file, so a test can kill -9 it exactly there.

Every file sdstudio must never leave half-written (output images, LoRA files, training states, settings) is
written to a temporary file and then given its name: moved into place with ``os.replace``, or, for output
pictures, hard-linked with ``os.link`` (which claims the name atomically). Run as the server command
(``python tests/fault_hold.py --hold-dir D --hold-write SUFFIX:N -- <sdstudio serve flags>``), this file makes
the N-th such naming of a file ending in ``SUFFIX`` the moment the server dies: the temporary file is first cut
to half its length (the write was under way when the power went), ``D/held`` gets the destination's path, and
the process waits there to be killed. Only this process is affected; the server is otherwise the one
``sdstudio serve`` builds from those flags.

``--hold-load N`` stops a model load instead: the checkpoint loader hands every tensor it reads from the file's
map to ``sdstudio.models.loader.usable_weight`` as it builds the model; at the N-th, ``D/held`` gets the model
files the process has mapped at that moment (from /proc/self/maps) and the load waits there, half done.
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


def hold_on_load(folder: Path, nth: int) -> None:
    from sdstudio.models import loader

    seen = [0]
    real = loader.usable_weight

    def weight(*args, **kwargs):
        seen[0] += 1
        if seen[0] == nth:
            maps = Path("/proc/self/maps").read_text().splitlines()
            mapped = sorted({line.split(maxsplit=5)[5] for line in maps
                             if len(line.split(maxsplit=5)) == 6 and line.endswith(".safetensors")})
            (folder / "held").write_text("\n".join(mapped))
            while True:
                time.sleep(1)
        return real(*args, **kwargs)

    loader.usable_weight = weight


def main(argv: list[str]) -> None:
    import uvicorn

    from sdstudio.cli import build_parser
    from sdstudio.server import create_app

    parser = argparse.ArgumentParser()
    parser.add_argument("--hold-dir", type=Path, required=True)
    parser.add_argument("--hold-write", help="SUFFIX:N")
    parser.add_argument("--hold-load", type=int, help="N: the N-th tensor a checkpoint load reads")
    own, rest = parser.parse_known_args(argv)
    if own.hold_write:
        suffix, nth = own.hold_write.rsplit(":", 1)
        hold_on_write(own.hold_dir, suffix, int(nth))
    if own.hold_load:
        hold_on_load(own.hold_dir, own.hold_load)
    args = build_parser().parse_args(["serve", *[a for a in rest if a != "--"]])
    uvicorn.run(create_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
