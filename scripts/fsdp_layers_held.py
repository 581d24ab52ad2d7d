"""How many decoder layers' worth of weights FSDP2 holds at once on one rank: the `gathered_layers` term of
scripts/memory_model.py's fsdp_rank_base_bytes.

    MALLOC_MMAP_THRESHOLD_=1048576 torchrun --nproc_per_node 2 scripts/fsdp_layers_held.py

Eight frozen bf16 layers (4096 -> 16384 -> 4096, 256 MiB each), every one its own FSDP2 unit as pefrl shards a
decoder layer (pefrl/fsdp.py), run forward without grad, forward with grad and backward on 4 x 8 rows. Each
rank's peak RSS above the RSS before (Linux VmHWM, reset with /proc/self/clear_refs) is divided by one layer's
bytes. The threshold gives every freed block back to the system, so the peak is what is live, not the heap.
On this project's CPU (gloo, torch 2.13): 3.00 / 3.03 / 3.05 layers: a layer's all-gather output, the
parameters copied out of it, and one more copy, in the forward and the backward alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

HIDDEN, LAYERS = 4096, 8


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(HIDDEN, 4 * HIDDEN, bias=False)
        self.down = nn.Linear(4 * HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _mib(key: str) -> float:
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key)) / 1024


def peak_above(fn) -> float:
    """fn() -> its peak RSS above the RSS before it, MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _mib("VmRSS:")
    out = fn()
    peak = _mib("VmHWM:") - before
    del out
    return peak


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = nn.Sequential(*[Layer() for _ in range(LAYERS)]).to(torch.bfloat16).requires_grad_(False)
    layer_mib = sum(p.numel() * p.element_size() for p in model[0].parameters()) / 2**20
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)
    x = torch.randn(4, 8, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # the lazy init's allocations, outside the measurements
    with torch.no_grad():
        no_grad = peak_above(lambda: model(x))
    xg = x.clone().requires_grad_(True)
    out = {}
    forward = peak_above(lambda: out.setdefault("y", model(xg)))
    backward = peak_above(lambda: out.pop("y").float().sum().backward())
    if dist.get_rank() == 0:
        print(f"one layer {layer_mib:.0f} MiB; peak held, in layers: forward without grad "
              f"{no_grad / layer_mib:.2f}, forward with grad {forward / layer_mib:.2f}, backward "
              f"{backward / layer_mib:.2f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
