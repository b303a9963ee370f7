"""Fixtures shared by the test modules (the plain helpers live in helpers.py)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny products are dominated by thread synchronisation on a shared 2-core machine: one thread.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
