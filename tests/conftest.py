import os
import sys

# Tests import the packages from this checkout whether or not it is pip-installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Keep the sample corpus cache of the test session out of the user's cache directory.
os.environ.setdefault("SUBTRACK_CACHE", os.path.join(ROOT, ".cache"))

# Subprocesses the tests start (torchrun-style ranks, the CLI) read one OpenMP thread each: the
# test machine's few cores are shared by several processes and engineers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Every test (and module-scoped fixture) runs with one intra-op thread: small tensors, where
    threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
