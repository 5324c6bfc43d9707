"""`python -m thrifty.longtail.worker DIR M`: fine-tune BTM subset M of the run in DIR (one process per subset;
started by `BTMRun.run_subsets` when workers > 1)."""

from __future__ import annotations

import sys

from thrifty.longtail.btm import BTMRun


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m thrifty.longtail.worker BTM_DIR SUBSET_INDEX", file=sys.stderr)
        return 2
    BTMRun.open(args[0]).finetune(int(args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
