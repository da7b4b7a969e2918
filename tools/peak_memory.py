"""Run a command and report the peak memory of its whole process tree (the fitting workers too).

    python tools/peak_memory.py --log rss.log -- loraq quantize t5xxl --out ckpt

Every 3 s it sums, over the processes of the command's session, VmRSS (resident) and RssAnon
(anonymous: what the processes allocated, as opposed to file pages such as memory-mapped weight
files, which the kernel can drop and read again), and MemAvailable; at the end it prints the peaks.
Linux only (/proc). Exit status: the command's.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

GIB = 2 ** 30


def _kib(line: str) -> int:
    return int(line.split()[1]) * 1024


def tree_memory(session: int) -> tuple[int, int]:
    """(resident, anonymous) bytes over the processes of ``session``."""
    rss = anon = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) != session:
                    continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += _kib(line)
                    elif line.startswith("RssAnon:"):
                        anon += _kib(line)
        except (OSError, ValueError, IndexError):
            continue  # the process ended between listing and reading
    return rss, anon


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(_kib(line) for line in f if line.startswith("MemAvailable:"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", help="write one line per sample here")
    ap.add_argument("--every", type=float, default=3.0, help="seconds between samples")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --")
    log = open(args.log, "w") if args.log else None
    t0 = time.time()
    proc = subprocess.Popen(cmd, start_new_session=True)
    peak_rss = peak_anon = 0
    low_avail = mem_available()
    try:
        while proc.poll() is None:
            rss, anon = tree_memory(proc.pid)
            avail = mem_available()
            peak_rss, peak_anon, low_avail = max(peak_rss, rss), max(peak_anon, anon), min(low_avail, avail)
            if log:
                log.write(f"{time.time() - t0:.0f} s  rss {rss / GIB:.2f}  anon {anon / GIB:.2f}  "
                          f"available {avail / GIB:.2f} GiB\n")
                log.flush()
            time.sleep(args.every)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
    print(f"peak_memory: {' '.join(cmd)}: exit {proc.returncode} after {time.time() - t0:.0f} s; peak resident "
          f"{peak_rss / GIB:.2f} GiB, peak anonymous {peak_anon / GIB:.2f} GiB, lowest MemAvailable "
          f"{low_avail / GIB:.2f} GiB", file=sys.stderr)
    return proc.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
