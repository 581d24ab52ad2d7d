"""train.mmap_threshold_mib (pefrl.heap): large blocks freed between long-lived small ones go back to the system."""

import os
import subprocess
import sys

import pytest

# 50 blocks of 4 MiB alive at once, each followed by a small tensor that stays; then every block is freed. On
# the heap (threshold 32 MiB, fixed so glibc's dynamic threshold cannot move it) the freed blocks are holes under
# live tensors, which the process keeps; in their own mappings (threshold 1 MiB) they leave the process.
CHURN = """
import sys, torch
from pefrl.heap import set_mmap_threshold
assert set_mmap_threshold(int(sys.argv[1]))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before, blocks, keep = rss(), [], []
for i in range(50):
    blocks.append(torch.ones(2**20))  # 4 MiB
    keep.append(torch.ones(64) * blocks[-1][0])
del blocks
print((rss() - before) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_freed_large_blocks_leave_the_process():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    grown = {mib: int(subprocess.run([sys.executable, "-c", CHURN, str(mib)], capture_output=True, text=True,
                                     check=True, env=env).stdout) for mib in (1, 32)}
    assert grown[1] < 16 and grown[32] > 100, grown  # MiB the process kept of the 200 it freed


def test_the_environment_wins(monkeypatch):
    from pefrl.heap import set_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(8 * 2**20))
    assert not set_mmap_threshold(1)


def test_the_default_threshold_is_one_mib_for_a_large_quantized_or_sharded_base_only():
    from pefrl.heap import auto_mmap_threshold

    assert auto_mmap_threshold(quantized=True, n_params=1_543_714_304) == 1  # the Qwen2.5-1.5B shape
    assert auto_mmap_threshold(quantized=True, n_params=134_515_008) == 0  # SmolLM2-135M: +27% CPU for it
    assert auto_mmap_threshold(quantized=False, n_params=8 * 10**9) == 0
    assert auto_mmap_threshold(quantized=False, n_params=1_235_814_400, sharded=True) == 1  # Llama-3.2-1B, FSDP
    assert auto_mmap_threshold(quantized=False, n_params=134_515_008, sharded=True) == 0
