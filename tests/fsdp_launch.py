"""`mdu` under FSDP2 on the CPU, for tests/test_distributed.py: run with
`accelerate launch --use_fsdp --fsdp_version 2 ... tests/fsdp_launch.py unlearn ...`
(`tests/fsdp_launch.py --check-anchor MODEL WANT.pt unlearn ...` runs the
anchor check of tests/fsdp_anchor_check.py first, in the same processes).

accelerate turns FSDP on for accelerators only and falls back to DDP on the
CPU, so `force_fsdp2()` pins its state to FSDP2 before the command starts.
Everything after that is the real path: accelerate's FSDP2 preparation,
torch's fully_shard over gloo (NCCL on GPUs), the full-state gather before
writing.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def force_fsdp2() -> None:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                            auto_wrap_policy="NO_WRAP")
    # Properties on the class win over the shared state accelerate re-derives.
    AcceleratorState.distributed_type = property(lambda self: DistributedType.FSDP, lambda self, value: None)
    AcceleratorState.fsdp_plugin = property(lambda self: plugin, lambda self, value: None)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--check-anchor"]:
        # tests/fsdp_anchor_check.py first, in the same two processes: one launch fewer.
        from fsdp_anchor_check import check_anchor

        check_anchor(args[1], args[2], force_fsdp2)
        args = args[3:]
    force_fsdp2()
    from mdu_cli.cli import cli

    cli.main(args=args, prog_name="mdu")
