"""`python -m thrifty.longtail.worker DIR M`: fine-tune BTM subset M of the run in DIR (one process per subset;
`run_workers` starts them when `BTMConfig.workers` > 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from thrifty.errors import ConfigError


def run_workers(output_dir: str, subsets: list[int], workers: int) -> None:
    """Fine-tune `subsets` in up to `workers` processes at once (each with cores / workers torch threads)."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "WORLD_SIZE": "1"}
    queue, running, failed = list(subsets), {}, []
    while queue or running:
        while queue and len(running) < workers:
            m = queue.pop(0)
            cmd = [sys.executable, "-m", "thrifty.longtail.worker", output_dir, str(m)]
            log = open(os.path.join(output_dir, f"subset{m}.log"), "ab")  # noqa: SIM115 (closed below)
            running[m] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.2)
        for m, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[m]
                print(f"BTM subset {m}: {'done' if proc.returncode == 0 else f'failed ({proc.returncode})'}")
                if proc.returncode != 0:
                    failed.append(m)
    if failed:
        raise ConfigError(f"BTM subsets {failed} failed; see {output_dir}/subset<m>.log, then rerun with resume")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m thrifty.longtail.worker BTM_DIR SUBSET_INDEX", file=sys.stderr)
        return 2
    from thrifty.longtail.btm import BTMRun

    BTMRun.open(args[0]).finetune(int(args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
