"""Run README.md's CLI block command by command, as a new user would, and record wall time and exit code.

    python benchmarks/readme_walkthrough.py --repo /tmp/fresh-clone --output benchmarks/results/readme_walkthrough.json

Runs in `--repo` (a fresh clone where `make test` or `make demo` already made .venv) with .venv/bin first on
PATH. A command ending in `&` starts in the background (the feature server) and is stopped at the end. Resumable:
a rerun skips the commands that already succeeded (same text) and continues with the first that did not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def cli_block(text: str) -> str:
    """The first ```bash block after the '## The CLI' heading of README.md."""
    section = text.split("## The CLI", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def shell_lines(block: str) -> list[str]:
    """One shell command per line: continuation lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [re.sub(r"\s+#\s.*$", "", line) for line in lines]  # a trailing comment (e.g. after `&`) is not run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=".", help="the clone to run in (with .venv made by make)")
    p.add_argument("--output", default="benchmarks/results/readme_walkthrough.json")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    args = p.parse_args(argv)
    repo = Path(args.repo).resolve()
    lines = shell_lines(cli_block((repo / "README.md").read_text()))
    done = json.loads(Path(args.output).read_text()) if os.path.isfile(args.output) else {"commands": []}
    ok = {r["command"] for r in done["commands"] if r["returncode"] == 0}
    env = {**os.environ, "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    background, records = [], [r for r in done["commands"] if r["command"] in ok]
    try:
        for line in lines:
            if line in ok and not line.endswith("&"):
                continue
            print(f"$ {line}", flush=True)
            if line.endswith("&"):
                background.append(subprocess.Popen(["bash", "-c", line[:-1]], cwd=repo, env=env))
                records.append({"command": line, "returncode": 0, "seconds": 0.0, "background": True})
                continue
            t0 = time.perf_counter()
            proc = subprocess.run(
                ["bash", "-c", line], cwd=repo, env=env, capture_output=True, text=True, timeout=args.timeout
            )
            rec = {"command": line, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
            rec["stdout_tail"], rec["stderr_tail"] = proc.stdout[-1500:], proc.stderr[-1500:]
            records.append(rec)
            print(f"  exit {proc.returncode} in {rec['seconds']:.0f} s\n{proc.stdout[-600:]}", flush=True)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"repo": str(repo), "commands": records}, indent=2))
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
    finally:
        for bg in background:
            bg.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
