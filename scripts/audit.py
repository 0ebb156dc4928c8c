"""Dependency audit: pip-audit over exactly what .venv holds (``pip freeze`` of it, the lock of what we install).

Fails (exit 1) on a known vulnerability that has a fixed version; one without a fix is listed and does not fail.
pip-audit runs from its own venv (``.venv/tools/pip-audit``), so its dependencies never mix with ours. The audit
is skipped, with the reason printed and exit 0, when pip-audit cannot be installed or its vulnerability source
does not answer from this machine: PyPI's per-release JSON (``https://pypi.org/pypi/NAME/VERSION/json``), else
OSV (``https://api.osv.dev``). A source that answers but knows none of our packages is a skip too: pip-audit
itself would report "No known vulnerabilities found" there. ``SDSTUDIO_AUDIT=0`` skips it on purpose.

Run by ./test.sh; alone: ``.venv/bin/python scripts/audit.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
TOOL = VENV / "tools" / "pip-audit"
TOOL_SPEC = "pip-audit>=2.7,<3"


def say(text: str) -> None:
    print(f"sdstudio audit: {text}", flush=True)


def skip(reason: str) -> int:
    say(f"skipped: {reason}")
    return 0


def answers(url: str, body: bytes | None = None) -> str | None:
    """None when ``url`` answers 200, else why not."""
    headers = {"Content-Type": "application/json"} if body else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=15) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def tool() -> Path | None:
    exe = TOOL / "bin" / "pip-audit"
    if exe.exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(TOOL)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(TOOL / "bin" / "python"), "-m", "pip", "install", "-q", TOOL_SPEC], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        say(f"could not install {TOOL_SPEC}: {getattr(exc, 'stderr', b'') or exc}")
        return None
    return exe if exe.exists() else None


def source() -> tuple[list[str], str | None]:
    """pip-audit's service flags, or (_, why neither source answers)."""
    pip_version = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "--version"], capture_output=True,
                                 text=True, check=False).stdout.split()[1]
    pypi = answers(f"https://pypi.org/pypi/pip/{pip_version}/json")
    if pypi is None:
        return ["--vulnerability-service", "pypi"], None
    query = json.dumps({"package": {"name": "pip", "ecosystem": "PyPI"}, "version": pip_version}).encode()
    osv = answers("https://api.osv.dev/v1/query", query)
    if osv is None:
        return ["--vulnerability-service", "osv"], None
    return [], (f"no vulnerability source answers from here (PyPI's per-release JSON "
                f"https://pypi.org/pypi/pip/{pip_version}/json: {pypi}; OSV https://api.osv.dev: {osv})")


def frozen() -> str:
    """What .venv holds, pinned; sdstudio itself (editable) left out."""
    out = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    return "".join(line + "\n" for line in out.splitlines() if "==" in line and not line.startswith("-"))


def report(data: dict) -> int:
    deps = data.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    if deps and not audited:
        return skip(f"the vulnerability source knew none of the {len(deps)} packages "
                    f"(e.g. {deps[0]['skip_reason']})")
    fixable, unfixed = [], []
    for dep in audited:
        for vuln in dep.get("vulns", []):
            line = f"{dep['name']} {dep['version']}: {vuln['id']}"
            if vuln.get("fix_versions"):
                fixable.append(f"{line} (fixed in {', '.join(vuln['fix_versions'])})")
            else:
                unfixed.append(f"{line} (no fixed version yet)")
    skipped = len(deps) - len(audited)
    say(f"{len(audited)} packages audited" + (f", {skipped} not known to the source (local builds)" if skipped else ""))
    for line in unfixed:
        say(f"known, unfixed: {line}")
    for line in fixable:
        say(f"VULNERABLE: {line}")
    if fixable:
        say(f"{len(fixable)} known vulnerabilities have a fix: upgrade those packages (pyproject.toml)")
        return 1
    say("no known vulnerability with a fix available")
    return 0


def main() -> int:
    if os.environ.get("SDSTUDIO_AUDIT", "1") == "0":
        return skip("SDSTUDIO_AUDIT=0")
    service, why = source()
    if why:
        return skip(why)
    exe = tool()
    if exe is None:
        return skip("pip-audit is not available")
    with tempfile.TemporaryDirectory() as tmp:
        requirements, out = Path(tmp) / "requirements.txt", Path(tmp) / "audit.json"
        requirements.write_text(frozen())
        run = subprocess.run([str(exe), "-r", str(requirements), "--no-deps", "--disable-pip", *service,
                              "-f", "json", "-o", str(out), "--progress-spinner", "off"],
                             capture_output=True, text=True, check=False, timeout=1800)
        if not out.exists():
            return skip(f"pip-audit gave no report (exit {run.returncode}): {run.stderr.strip()[-500:]}")
        return report(json.loads(out.read_text()))


if __name__ == "__main__":
    sys.exit(main())
