"""
Benchmark of decompose.py at scale: seconds and peak resident memory of the whole CLI run on a
generated N x d_l float32 lang_emb.npy (default 1M x 1536, 6.1 GB on disk, the size of an
OpenAI text-embedding-3-small table of a million items).

    python bench/bench_decompose.py                       # 1M x 1536; needs ~6.5 GB free in --tmp
    python bench/bench_decompose.py --rows 100000 --d_l 384

The matrix is written by a child process (so its pages do not count here), with a decaying
spectrum; then `decompose.py DATA` runs as a subprocess and os.wait4 gives its own peak RSS.
The file was just written, so it is read from the page cache: a cold disk adds its read time.
Prints the generation time, the CLI's output, its wall seconds and peak RSS, and for scale the
peak RSS of a bare `import numpy, torch` and the size of the output lang_emb.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_matrix(path, rows, d_l, seed=0):
    """N(0, 1) columns scaled by a power-law spectrum, written block by block into a .npy."""
    rng = np.random.default_rng(seed)
    scales = (np.arange(1, d_l + 1, dtype=np.float32) ** -0.75).astype(np.float32)  # (d_l,)
    emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d_l))
    block = max(1, (1 << 25) // (4 * d_l))
    for start in range(0, rows, block):
        b = min(block, rows - start)
        emb[start:start + b] = rng.standard_normal((b, d_l), dtype=np.float32) * scales
    emb.flush()
    del emb


def run_measured(cmd):
    """Run cmd; return (stdout+stderr, exit code, wall s, CPU s (user + sys), peak RSS GB) of that child."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return output, proc.returncode, time.perf_counter() - t, cpu, usage.ru_maxrss * 1024 / 1e9  # KB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="N, items in the generated matrix")
    parser.add_argument("--d_l", type=int, default=1536, help="d_l, embedding dimension")
    parser.add_argument("--tmp", default=None, help="folder for the temporary DATA (default: the system temp)")
    parser.add_argument("--npy", default=None, help="use this existing (N, d_l) .npy instead of generating one")
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)  # child mode: only write the matrix
    args = parser.parse_args(argv)
    if args.write:
        write_matrix(args.write, args.rows, args.d_l)
        return
    data = tempfile.mkdtemp(prefix="bench_decompose_", dir=args.tmp)
    try:
        path = os.path.join(data, "lang_emb.npy")
        t = time.perf_counter()
        if args.npy:
            os.symlink(os.path.abspath(args.npy), path)
            args.rows, args.d_l = np.load(path, mmap_mode="r").shape
        else:
            subprocess.run([sys.executable, __file__, "--write", path, "--rows", str(args.rows), "--d_l", str(args.d_l)], check=True)
        print(f"{'using' if args.npy else 'generated'} {args.rows} x {args.d_l} ({os.path.getsize(path) / 1e9:.2f} GB) "
              f"in {time.perf_counter() - t:.1f} s")
        with open(os.path.join(data, "items.jsonl"), "w") as f:
            f.writelines(json.dumps({"item_id": str(i), "text": f"item {i}"}) + "\n" for i in range(args.rows))
        *_, base_rss = run_measured([sys.executable, "-c", "import numpy, torch"])
        load = os.getloadavg()[0]
        output, code, wall, cpu, rss = run_measured([sys.executable, os.path.join(REPO, "decompose.py"), data])
        print(output.rstrip())
        if code:
            sys.exit(f"decompose.py failed with exit code {code}")
        out_gb = (args.rows + 1) * 128 * 4 / 1e9
        print(f"decompose.py {args.rows} x {args.d_l}: {wall:.1f} s wall, {cpu:.1f} s CPU (user + sys), "
              f"peak RSS {rss:.2f} GB (a bare 'import numpy, torch': {base_rss:.2f} GB; "
              f"the output lang_emb: {out_gb:.2f} GB)")
        # the machine may be shared: the load says how many cores were really free
        print(f"cores: {os.cpu_count()}, load average before / after: {load:.1f} / {os.getloadavg()[0]:.1f}; "
              f"peak RSS of this bench process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
