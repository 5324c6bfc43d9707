"""README.md's CLI block runs as written, in order: every command parses with the real CLI parser, every input
path it names is an output of an earlier command, and every method, compressor, dataset, backbone and suite it
names is registered. (The by-hand walk-through that runs them is benchmarks/readme_walkthrough.py.)"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from thrifty.backbones import BackboneSpec
from thrifty.backbones.registry import backbone_kind
from thrifty.bench.suite import find_suite
from thrifty.cli.main import build_parser
from thrifty.compress import available_compressors
from thrifty.data.registry import parse_data_spec
from thrifty.tuners import available_methods


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "benchmarks"))
from readme_walkthrough import cli_block, shell_lines  # noqa: E402 (the walk-through's own reading of README)


INPUTS = ("adapter", "cache", "quantized", "onnx", "token_file", "checkpoint", "dir")  # dests naming inputs


def commands(block: str) -> list[list[str]]:
    """Shell commands of the block as argv lists (readme_walkthrough.shell_lines), comments and a trailing `&`
    dropped; a `> FILE` redirection is kept as the two tokens ['>', FILE]."""
    out = []
    for line in shell_lines(block):
        argv = shlex.split(line, comments=True)
        out.append(argv[:-1] if argv[-1] == "&" else argv)
    return out


def thrifty_argv(argv: list[str]) -> list[str] | None:
    """The thrifty arguments of `thrifty ...` or `torchrun ... -m thrifty.cli.main ...`; None for other tools."""
    if argv[0] == "thrifty":
        return argv[1:]
    if argv[0] == "torchrun" and "thrifty.cli.main" in argv:
        return argv[argv.index("thrifty.cli.main") + 1 :]
    return None


def produced(path: str, outputs: list[str]) -> bool:
    """`path` is an earlier output, or lies inside one (e.g. runs/q/model.onnx of `--output runs/q --onnx`)."""
    return any(path == o or path.startswith(o.rstrip("/") + "/") for o in outputs)


def test_every_readme_command_parses_and_its_inputs_come_from_earlier_commands():
    parser = build_parser()
    outputs: list[str] = []
    checked = 0
    for argv in commands(cli_block(README.read_text())):
        if ">" in argv:  # e.g. the token file
            outputs.append(argv[argv.index(">") + 1])
            continue
        args_list = thrifty_argv(argv)
        assert args_list is not None, f"README runs a tool the test does not know: {argv[0]}"
        args = parser.parse_args(args_list)
        for dest in INPUTS:
            path = getattr(args, dest, None)
            if isinstance(path, str):
                assert produced(path, outputs), f"`{' '.join(argv)}`: {path} is not made by an earlier command"
        if getattr(args, "backbone", None):
            backbone_kind(BackboneSpec(args.backbone))
        if getattr(args, "data", None):
            parse_data_spec(args.data)
        method = getattr(args, "method", None)
        if method:
            known = available_compressors() if args.command in ("quantize", "compress") else available_methods()
            assert method in known, f"`{' '.join(argv)}`: unknown method {method}"
        for m in (getattr(args, "methods", None) or "").split(","):
            assert not m or m in available_methods(), m
        if getattr(args, "suite", None):
            find_suite(args.suite)
        if getattr(args, "output", None):
            outputs.append(args.output)
        checked += 1
    assert checked >= 15


def test_the_checker_catches_a_missing_input():
    block = "thrifty eval --data reviews:1k --adapter runs/never-trained\n"
    argv = commands(block)[0]
    args = build_parser().parse_args(thrifty_argv(argv))
    assert not produced(args.adapter, ["runs/lora-reviews"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--no-such-flag"])


def python_block(text: str) -> str:
    """The first ```python block after the '## Python API' heading of README.md."""
    return re.search(r"```python\n(.*?)```", text.split("## Python API", 1)[1], re.S).group(1)


def thrifty_calls(source: str) -> list[tuple[str, list[str]]]:
    """Every dotted name rooted at `thrifty` in `source` (e.g. 'thrifty.train.run_training'), with the keyword
    names it is called with (empty when it is not called)."""
    tree = ast.parse(source)
    calls = {id(n.func): [k.arg for k in n.keywords if k.arg] for n in ast.walk(tree) if isinstance(n, ast.Call)}
    out = []
    for node in ast.walk(tree):
        parts, cur = [], node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if parts and isinstance(cur, ast.Name) and cur.id == "thrifty" and isinstance(node, ast.Attribute):
            out.append((".".join(["thrifty", *reversed(parts)]), calls.get(id(node), [])))
    return [(name, kw) for name, kw in out if not any(o.startswith(name + ".") for o, _ in out)]


def test_the_python_api_snippet_names_what_a_fresh_import_provides():
    """Each `thrifty.x.y` of README's Python block resolves after a bare `import thrifty` in a fresh interpreter
    (the test process may have imported submodules already), and every keyword it passes is a parameter."""
    names = thrifty_calls(python_block(README.read_text()))
    assert any(name == "thrifty.train.run_training" for name, _ in names)  # the block still shows a training run
    check = (
        "import inspect, json, sys, thrifty\n"
        "for name, kws in json.loads(sys.argv[1]):\n"
        "    obj = thrifty\n"
        "    for part in name.split('.')[1:]:\n"
        "        obj = getattr(obj, part)\n"
        "    if kws:\n"
        "        inspect.signature(obj).bind_partial(**dict.fromkeys(kws))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check, json.dumps(names)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_snippet_checker_catches_a_name_a_bare_import_lacks():
    names = thrifty_calls("import thrifty\nthrifty.no_such_module.run(x=1)\n")
    assert names == [("thrifty.no_such_module.run", ["x"])]
    proc = subprocess.run(
        [sys.executable, "-c", "import thrifty; thrifty.no_such_module"], capture_output=True, text=True
    )
    assert proc.returncode != 0
