"""Test-suite helpers shipped with the package (no torch import at module level).

:func:`mark_device_tests` is what ``tests/conftest.py`` calls from ``pytest_collection_modifyitems``:
the kernel tests that take the ``kt`` or ``triton_path`` fixture run on ``kt.device``, which is the
GPU (compiled Triton kernels) on a CUDA machine and the CPU (Triton's interpreter) elsewhere. On a
CUDA machine they are GPU tests, so they get the ``gpu`` marker there and ``pytest -m gpu`` selects
them; on a CPU machine they stay unmarked and run in CI under the interpreter.
"""

from __future__ import annotations

from pathlib import Path

#: fixtures whose tests run on the active device (see tests/conftest.py)
DEVICE_FIXTURES = ("kt", "triton_path")


def mark_device_tests(items, root: Path, cuda: bool, marker) -> list:
    """Add ``marker`` to each item under ``root`` that uses a device fixture, when ``cuda``.
    Returns the items marked."""
    if not cuda:
        return []
    root = Path(root).resolve()
    marked = []
    for item in items:
        path = Path(item.path).resolve()
        if root in path.parents and any(f in item.fixturenames for f in DEVICE_FIXTURES):
            item.add_marker(marker)
            marked.append(item)
    return marked
