"""Peak resident memory of the converters, measured in a fresh process (test_ckpt_memory.py).

``python _memory_worker.py WARM_HF BIG_HF WORKDIR`` converts WARM_HF first (imports, one-time
allocations), then measures each conversion of BIG_HF: the resident set size just before it and
its high-water mark during it (the kernel's ``VmHWM``, reset through ``/proc/self/clear_refs``;
if that is not permitted, a thread sampling ``VmRSS`` every millisecond). Prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class Peak:
    """Resident-memory high-water mark over a ``with`` block."""

    def __enter__(self):
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled VmRSS"
            self._stop = threading.Event()
            self._max = 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.before = _status("VmRSS")
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _status("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            self.peak = _status("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _status("VmRSS"))
        self.delta = self.peak - self.before
        return False


def main(warm: str, big: str, work: str) -> None:
    from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf

    work_dir = Path(work)
    quiet = lambda *_: None  # noqa: E731
    convert_hf_to_mcore(warm, work_dir / "warm_ckpt", log=quiet)
    convert_mcore_to_hf(work_dir / "warm_ckpt", work_dir / "warm_back", log=quiet)
    with Peak() as to_mcore:
        convert_hf_to_mcore(big, work_dir / "big_ckpt", log=quiet)
    with Peak() as to_hf:
        convert_mcore_to_hf(work_dir / "big_ckpt", work_dir / "big_back", max_shard_size="16MB", log=quiet)
    print(json.dumps({
        "method": to_mcore.method,
        "hf_to_mcore": {"before": to_mcore.before, "peak": to_mcore.peak, "delta": to_mcore.delta},
        "mcore_to_hf": {"before": to_hf.before, "peak": to_hf.peak, "delta": to_hf.delta},
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
