"""What a random 4 KiB read of a file mapped into memory costs from the disk, with and without MADV_RANDOM.

    python benchmarks/mapped_reads.py --dir /work/kv --size 2g --pages 2000

``MSCache(kv_dir=...)`` keeps keys and values in mapped files, and MS attention reads a few regions of
them here and there (a region of 16 tokens x 64 channels in float32 is one 4 KiB page). When a page is
no longer in the page cache, a fault on a mapping without advice reads the pages around it too (the
device's read-ahead, ``/sys/block/DEV/queue/read_ahead_kb``). This writes a file of ``--size`` into
``--dir``, drops it from the page cache (``POSIX_FADV_DONTNEED``), and reads one byte of ``--pages``
random pages through a fresh mapping, default advice and ``MADV_RANDOM`` in turn: the bytes read from the
disk (``/proc/self/io``) and the seconds. Linux only.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import tempfile
import time


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=".", help="a folder on the disk to measure")
    ap.add_argument("--size", default="2g", help="file size: 2g, 512m, ...")
    ap.add_argument("--pages", type=int, default=2000)
    args = ap.parse_args(argv)
    size = int(args.size[:-1]) << {"g": 30, "m": 20}[args.size[-1].lower()]
    fd, path = tempfile.mkstemp(dir=args.dir)
    os.unlink(path)
    try:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            os.write(fd, block)
        os.fsync(fd)
        for advice in ("default", "MADV_RANDOM"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
            mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            if advice == "MADV_RANDOM":
                mapping.madvise(mmap.MADV_RANDOM)
            rng = random.Random(0)
            before, start = read_bytes(), time.perf_counter()
            for _ in range(args.pages):
                mapping[rng.randrange(size >> 12) << 12]
            print(f"{advice}: {args.pages} random 4 KiB pages of a {args.size} file: "
                  f"{(read_bytes() - before) / 2**20:,.0f} MiB read from the disk, {time.perf_counter() - start:.2f} s")
            mapping.close()
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
