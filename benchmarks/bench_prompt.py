"""Prompt-schedule parsing time: the one-pass reader in sdstudio.core.prompt vs the lark Earley grammar it replaced.

The old implementation is taken from git (the parent of the commit that removed ``import lark`` from
sdstudio/core/prompt.py) and needs the ``lark`` package, which sdstudio no longer depends on; without it only the
new times print. Prompts: random bracket-heavy pieces of A1111's syntax (edits, cycles, weights, strays), one per
length, the same seed for both. Each old parse runs under a time limit (``--limit``, default 60 s).

Usage: python benchmarks/bench_prompt.py [--lengths 100,300,600,900,5000] [--shapes soup,nested,strays] [--steps 20]
       [--limit 60]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdstudio.core import prompt as new

PIECES = ["[", "]", "(", ")", ":", "a", " ", "cat", "1", "0.5", "[a:b:2]", "[c|d]", "(e:1.2)", "[f:3]"]


def bracket_heavy(length: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = ""
    while len(out) < length:
        out += rng.choice(PIECES)
    return out[:length]


SHAPES = {
    "soup": bracket_heavy,  # random pieces of the syntax
    "nested": lambda n: "[(" * (n // 4) + ")]" * (n // 4),  # groups nested n/2 deep
    "strays": lambda n: ("]:" * n)[:n],  # brackets and colons that form nothing
}


def old_module():
    """The lark-based prompt.py from git, or None (no lark, no git history)."""
    if importlib.util.find_spec("lark") is None:
        return None
    git = ["git", "-C", str(ROOT)]
    change = subprocess.run([*git, "log", "-1", "--format=%H", "-S", "import lark", "--", "sdstudio/core/prompt.py"],
                            check=False, capture_output=True, text=True).stdout.strip()
    if not change:
        return None
    source = subprocess.run([*git, "show", f"{change}^:sdstudio/core/prompt.py"], check=False, capture_output=True,
                            text=True)
    if source.returncode or "import lark" not in source.stdout:
        return None
    path = Path(tempfile.mkdtemp()) / "old_prompt.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("old_prompt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Late(Exception):
    pass


def timed(fn, *args, limit: float | None = None) -> tuple[float | None, object]:
    """(seconds ``fn(*args)`` took, its result); (None, None) past ``limit``."""
    if limit:
        def late(*_):
            raise _Late
        signal.signal(signal.SIGALRM, late)
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        start = time.perf_counter()
        result = fn(*args)
        return time.perf_counter() - start, result
    except _Late:
        return None, None
    except Exception as exc:  # the old parser overflows Python's stack on deep nesting  # noqa: BLE001
        return time.perf_counter() - start, exc
    finally:
        if limit:
            signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="100,300,600,900,5000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--limit", type=float, default=60.0)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="of " + ", ".join(SHAPES))
    args = ap.parse_args()
    old = old_module()
    if old is None:
        print("old lark parser unavailable (no lark or no git history): new times only")
    print(f"{'shape':>7} {'chars':>6} {'old s':>9} {'new s':>9} {'old/new':>9}")
    for shape, length in ((s, int(n)) for s in args.shapes.split(",") for n in args.lengths.split(",")):
        text = SHAPES[shape](length)
        runs = [timed(new.prompt_schedule, text, args.steps) for _ in range(3)]
        t_new, result = min(t for t, _ in runs), runs[0][1]
        t_old, old_result = timed(old.prompt_schedule, text, args.steps, limit=args.limit) if old else (None, None)
        if isinstance(old_result, Exception):
            print(f"{shape:>7} {length:>6} (the old parser raised {type(old_result).__name__})")
        elif t_old is not None and old_result != result:
            print(f"{shape:>7} {length:>6} (readings differ: stray brackets right after an edit, see core/prompt.py)")
        old_s = "-" if old is None else (f">{args.limit:.0f}" if t_old is None else f"{t_old:.3f}")
        ratio = f"{t_old / t_new:.0f}x" if t_old else ("-" if old is None else f">{args.limit / t_new:.0f}x")
        print(f"{shape:>7} {length:>6} {old_s:>9} {t_new:>9.4f} {ratio:>9}", flush=True)


if __name__ == "__main__":
    main()
