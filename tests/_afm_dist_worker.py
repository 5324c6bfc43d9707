"""Run by tests/test_afm.py, alone or under `torch.distributed.run --nproc_per_node 2` (gloo, CPU): every rank reads
its shard of the proxy batches (rank r: batches r, r + W, ...), `compress_` all-reduces the statistics, rank 0 saves
the compressed state dict and the ranks to argv[1]."""

from __future__ import annotations

import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _ctr_models import tiny_batches, tiny_ctr


def main() -> None:
    out = sys.argv[1]
    rule = json.loads(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    from thrifty.compress import compress_
    from thrifty.compress.afm import AFMConfig

    torch.set_num_threads(1)
    model = tiny_ctr("deepfm")
    batches = tiny_batches(8, 32, seed=3)[rank::world]
    compress_(model, AFMConfig(**rule), batches)
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + ".safetensors")
        with open(out + ".json", "w") as fh:
            json.dump(model.thrifty_compress["summary"], fh)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
