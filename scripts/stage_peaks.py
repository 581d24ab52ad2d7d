"""Peak RSS per stage of a pefrl step, for the benchmark children (scripts/bench.py --child-pefrl)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StagePeaks:
    """Peak RSS per stage of pefrl's step (and of everything before the first stage: loading), from Linux's
    VmHWM, which is reset at each stage boundary (/proc/self/clear_refs 5). Installed in the benchmark child
    only, by wrapping pefrl.trainer.Timer's stages; `overall` keeps the true peak (getrusage's is reset too)."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.overall = 0

    @staticmethod
    def _hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def mark(self, name: str) -> None:
        """Attribute the peak since the last mark to `name`, then restart the peak from the current RSS."""
        hwm = self._hwm()
        self.peaks[name] = max(self.peaks.get(name, 0), hwm)
        self.overall = max(self.overall, hwm)
        Path("/proc/self/clear_refs").write_text("5")

    @contextmanager
    def installed(self) -> Iterator[None]:
        """pefrl.trainer.Timer wrapped so each stage marks its peak, for the `with` block only."""
        import pefrl.trainer

        base, peaks = pefrl.trainer.Timer, self

        class StageTimer(base):
            def __call__(self, name: str):
                span = super().__call__(name)

                class _Span:
                    def __enter__(self):
                        peaks.mark("load" if not peaks.peaks else "other")  # what ran since the last stage
                        return span.__enter__()

                    def __exit__(self, *exc):
                        span.__exit__(*exc)
                        peaks.mark(name)

                return _Span()

        pefrl.trainer.Timer = StageTimer
        try:
            yield
        finally:
            pefrl.trainer.Timer = base
