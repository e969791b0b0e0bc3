"""``just bench``: run every benchmark and write bench/REPORT.md.

Each bench script prints its figures beside a baseline measured in the same
run (ratios, never asserted); this collects their output verbatim, with the
machine it ran on and how loaded it was, so a reader can judge the numbers.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "frames.py",
    "tls.py",
    "dirty.py",
    "migrate.py",
    "postcopy.py",
    "recovery.py",
    "mapped_ram.py",
]


def machine() -> list[str]:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    load = os.getloadavg()
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} cores, {mem} RAM, kernel {platform.release()}, Python {platform.python_version()}",
        f"- load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    scripts = [HERE / name for name in ORDER if (HERE / name).exists()]
    scripts += sorted(
        p
        for p in HERE.glob("*.py")
        if p.name not in ORDER and not p.name.startswith("_") and p.name != "report.py"
    )
    lines = [
        "# godwit benchmark report",
        "",
        "Written by `just bench` (bench/report.py). Every figure is",
        "printed beside a baseline measured in the same run, as a ratio; the machine is shared",
        "and noisy, so compare ratios, not absolute numbers.",
        "",
        *machine(),
        "",
    ]
    status = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        started = time.monotonic()
        cmd = [sys.executable, str(script), *(["--quick"] if quick else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        took = time.monotonic() - started
        print(proc.stdout, end="")
        lines += [
            f"## {script.name}",
            "",
            f"`python bench/{script.name}`"
            f"{' --quick' if quick else ''} — {took:.0f} s, exit {proc.returncode}",
            "",
            "```",
            proc.stdout.rstrip(),
            "```",
            "",
        ]
        if proc.returncode:
            status = 1
            lines += ["stderr (tail):", "", "```", proc.stderr.rstrip()[-3000:], "```", ""]
    (HERE / "REPORT.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'REPORT.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
