"""train.mmap_threshold_mib (pefrl.heap): large blocks freed between long-lived small ones go back to the system."""

import os
import subprocess
import sys

import pytest

# 200 blocks of 4 MiB, each followed by a small tensor that stays: on glibc's heap every freed block is a hole
# under a live tensor, which the process keeps; in their own mappings they are returned when freed
CHURN = """
import sys, torch
from pefrl.heap import set_mmap_threshold
if sys.argv[1] == "on":
    assert set_mmap_threshold(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before, keep = rss(), []
for i in range(200):
    block = torch.ones(2**20)  # 4 MiB
    keep.append(torch.ones(64) * block[0])
    del block
print((rss() - before) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_freed_large_blocks_leave_the_process():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    grown = {mode: int(subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                                      check=True, env=env).stdout) for mode in ("off", "on")}
    assert grown["on"] < 16 < grown["off"], grown  # MiB the process grew by


def test_the_environment_wins(monkeypatch):
    from pefrl.heap import set_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(8 * 2**20))
    assert not set_mmap_threshold(1)
