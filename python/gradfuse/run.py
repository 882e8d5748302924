"""Single-node launcher: ``python -m gradfuse.run -np N script.py args...`` (or ``-m module``).

Starts N copies of the script with the torchrun-style variables gradfuse.init() reads (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). When one copy fails the
others are stopped, and the launcher exits with the first failing exit code."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from .launch import free_port


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gradfuse.run", description=__doc__)
    p.add_argument(
        "-np",
        "--num-proc",
        type=int,
        required=True,
        dest="np",
        help="number of processes to start on this host",
    )
    p.add_argument(
        "-m",
        dest="module",
        action="store_true",
        help="run the program as a module (python -m program)",
    )
    p.add_argument("program", help="the script (or module with -m) to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args(argv)
    if args.np < 1:
        p.error(f"-np must be >= 1, got {args.np}")
    return args


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    port = free_port()
    cmd = [sys.executable] + (["-m"] if args.module else []) + [args.program] + args.args
    procs = []
    base_env = dict(os.environ)
    if args.np > 1 and "OMP_NUM_THREADS" not in base_env:
        # As torchrun does: N ranks each using every core oversubscribe the machine.
        base_env["OMP_NUM_THREADS"] = "1"
    for rank in range(args.np):
        env = dict(
            base_env,
            RANK=str(rank),
            WORLD_SIZE=str(args.np),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(args.np),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen(cmd, env=env))

    def stop_all(sig=signal.SIGTERM):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, lambda *_: stop_all())
    exit_code = 0
    try:
        while [p.poll() for p in procs].count(None):  # poll() every rank, no short circuit
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed and exit_code == 0:
                exit_code = failed[0].returncode
                rank = procs.index(failed[0])
                print(
                    f"gradfuse.run: rank {rank} exited with code {exit_code}; stopping the others",
                    file=sys.stderr,
                )
                stop_all()
            time.sleep(0.05)
    except KeyboardInterrupt:
        stop_all(signal.SIGINT)
        exit_code = 130
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if exit_code == 0:
        codes = [p.returncode for p in procs if p.returncode != 0]
        exit_code = codes[0] if codes else 0
    # A rank killed by a signal has a negative code; report it the way a shell would.
    return 128 - exit_code if exit_code < 0 else exit_code


if __name__ == "__main__":
    sys.exit(main())
