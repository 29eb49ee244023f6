"""Shared pytest setup: GPU-marked tests are skipped without CUDA; the suite's parallel workers
(pytest-xdist, ``scripts/test.sh``) get whole modules, and one worker gets everything that shares a
service or a session fixture (the cluster tests' SLURM, the real model)."""

import pytest
import torch

# Directories whose modules share a session fixture or a service, so one worker runs all of them:
# the cluster tests' SLURM and reference run; SmolLM2-135M, fetched and converted once.
SHARED = ("cluster", "realmodel")


def work_unit(nodeid: str) -> str:
    """What one worker runs whole: the test's directory in ``SHARED``, else its module (so a
    module-scoped fixture is built once)."""
    path = nodeid.split("::")[0]
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" and parts[1] in SHARED else path


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (``scripts/test.sh``) by ``work_unit``, in collection order:
    ``--no-loadscope-reorder`` starts the long cluster, distributed and end-to-end modules
    first and leaves the short unit modules to fill the end."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
