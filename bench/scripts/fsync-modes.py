#!/usr/bin/env python3
"""One small record written and synced N times, three ways (BENCHMARKS.md, "Write-ahead log
appends that change no metadata"): appended to a growing file, overwriting zeros written
beforehand, and into space reserved with posix_fallocate. Prints wall and CPU time per sync.
    python3 bench/scripts/fsync-modes.py DIR [N]
"""
import os
import resource
import sys
import time

d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
rec = b"x" * 1200


def run(mode):
    p = os.path.join(d, "fsync-modes-" + mode)
    if os.path.exists(p):
        os.unlink(p)
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        if mode == "prezero":
            os.write(fd, b"\0" * (len(rec) * n + 4096))
            os.fsync(fd)
            os.lseek(fd, 0, 0)
        elif mode == "falloc":
            os.posix_fallocate(fd, 0, len(rec) * n + 4096)
            os.fsync(fd)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, rec)
            os.fdatasync(fd)
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
        os.unlink(p)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"{mode:8} {1e6 * (t1 - t0) / n:7.1f} us wall, {1e6 * cpu / n:6.1f} us cpu per sync")


for m in ["append", "prezero", "falloc", "append", "prezero", "falloc"]:
    run(m)
