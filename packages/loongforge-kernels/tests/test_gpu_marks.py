"""The conftest's gpu marking: device-parametric tests are GPU tests exactly on a CUDA machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from loongforge_kernels.testing import mark_device_tests


class _Item:
    def __init__(self, path, fixtures):
        self.path, self.fixturenames, self.markers = Path(path), list(fixtures), []

    def add_marker(self, marker):
        self.markers.append(marker)


def _items(root: Path):
    return [_Item(root / "test_a.py", ["kt", "tmp_path"]), _Item(root / "test_b.py", ["triton_path"]),
            _Item(root / "test_c.py", ["monkeypatch"]), _Item(root.parent / "other" / "test_d.py", ["kt"])]


def test_device_tests_marked_gpu_only_on_cuda(tmp_path):
    root = tmp_path / "tests"
    items = _items(root)
    assert mark_device_tests(items, root, cuda=False, marker=pytest.mark.gpu) == []
    assert all(not i.markers for i in items)
    marked = mark_device_tests(items, root, cuda=True, marker=pytest.mark.gpu)
    assert [i.path.name for i in marked] == ["test_a.py", "test_b.py"]  # not the CPU-only one, not outside root
    assert all(i.markers == [pytest.mark.gpu] for i in marked)


def _declared_gpu(item) -> bool:
    """A GPU-only test, marked ``gpu`` in its source (module ``pytestmark`` or a decorator)."""
    marks = []
    for owner in (getattr(item, "module", None), getattr(item, "function", None)):
        declared = getattr(owner, "pytestmark", [])
        marks += declared if isinstance(declared, list) else [declared]
    return any(getattr(m, "name", None) == "gpu" for m in marks)


def test_this_session_marks_follow_the_device(request):
    """In this very run: a device-parametric test carries ``gpu`` iff CUDA is available (tests
    declared GPU-only in their source carry it everywhere and are left out)."""
    import torch

    session_items = request.session.items
    device_tests = [i for i in session_items if "kt" in i.fixturenames and Path(__file__).parent in i.path.parents
                    and not _declared_gpu(i)]
    if not device_tests:
        pytest.skip("no device-parametric kernel test collected with this one")
    for item in device_tests:
        assert (item.get_closest_marker("gpu") is not None) == torch.cuda.is_available(), item.nodeid
