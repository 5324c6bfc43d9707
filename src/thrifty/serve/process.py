"""Run `thrifty serve` as a child process (tests, benchmarks, demos): start, wait until it listens, kill,
restart on the same port. Always pass `--lifetime` so a forgotten server stops by itself."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

from thrifty.backbones.remote.protocol import RemoteError
from thrifty.runtime.child import child_env


LISTENING = re.compile(r"listening on (http://\S+):(\d+)")


class ServerProcess:
    """`thrifty serve ARGS` in a child process. `start()` returns the URL once the server accepts requests;
    `port=0` picks a free port on the first start and keeps it for restarts."""

    def __init__(self, args: list[str], port: int = 0, startup_timeout: float = 180.0):
        self.args, self.port, self.startup_timeout = list(args), port, startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: list[str] = []

    def start(self) -> str:
        env = child_env()
        cmd = [sys.executable, "-m", "thrifty.cli.main", "serve", *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(self.proc, lines), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            if m := LISTENING.search(line):
                self.port, self.url = int(m.group(2)), f"{m.group(1)}:{m.group(2)}"
                return self.url
        self.kill()
        raise RemoteError(f"thrifty serve did not start: {' | '.join(self.output[-10:])}")

    def _drain(self, proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            self.output.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    def kill(self) -> None:
        """SIGKILL (no shutdown of any kind), then reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
