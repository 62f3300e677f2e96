import pytest


@pytest.fixture
def megatron_cpu():
    from loongforge.testing import single_process_megatron

    with single_process_megatron() as backend:
        yield backend
