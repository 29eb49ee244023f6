"""scripts/test.sh's two pytest-xdist workers: what one worker runs whole (tests/conftest.py)."""

from tests.conftest import work_unit


def test_a_shared_directory_is_one_unit_and_other_modules_their_own():
    assert work_unit("tests/cluster/test_slurm_requeue.py::test_a") == "cluster"
    assert work_unit("tests/cluster/test_launchers.py::test_b[x::y]") == "cluster"
    assert work_unit("tests/realmodel/test_smollm2.py::test_c") == "realmodel"
    assert work_unit("tests/e2e/test_dpo_cli.py::test_d") == "tests/e2e/test_dpo_cli.py"
    assert work_unit("tests/e2e/test_dpo_cli.py::test_e") == "tests/e2e/test_dpo_cli.py"
    assert work_unit("tests/unit/test_cluster.py::test_f") == "tests/unit/test_cluster.py"
