"""Shared by the multi-process tests: the command prefix that starts 2 (or `nproc`) gloo ranks on this machine."""

import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node N --master_port <free port>`; append the script or
    `-m module` and its arguments."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]
