"""Launcher discovery from fake environments: torchrun/deepspeed, Open MPI, PMI, Slurm, mpi4py, single."""

from __future__ import annotations

import pytest

from engine.distributed.launch import LaunchInfo, discover, slurm_tasks_on_node
from engine.distributed.nodelist import expand_nodelist
from engine.errors import LaunchError


def no_mpi():
    return None


def test_nothing_set_is_a_single_process() -> None:
    assert discover({}, mpi_world=no_mpi) == LaunchInfo(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def test_torchrun() -> None:
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
    }
    assert discover(env, mpi_world=no_mpi) == LaunchInfo(5, 8, 1, 4, "n1", 1234, "torchrun")


def test_deepspeed_launcher_local_size() -> None:
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29600",
        "CROSS_RANK": "0",
    }
    assert discover(env, mpi_world=no_mpi) == LaunchInfo(1, 2, 1, 2, "127.0.0.1", 29600, "torchrun")


def test_partial_torchrun_env_names_what_is_missing() -> None:
    with pytest.raises(LaunchError) as err:
        discover({"RANK": "0", "LOCAL_RANK": "0"}, mpi_world=no_mpi)
    assert str(err.value).startswith(
        "torchrun launch detected (RANK or WORLD_SIZE is set) but WORLD_SIZE, MASTER_ADDR, MASTER_PORT are missing"
    )


def test_rank_outside_world_and_bad_integer() -> None:
    base = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(LaunchError, match=r"^torchrun launch: rank 2 outside \[0, world size 2\)$"):
        discover({**base, "RANK": "2"}, mpi_world=no_mpi)
    with pytest.raises(LaunchError, match=r"^torchrun: RANK='x' is not an integer$"):
        discover({**base, "RANK": "x"}, mpi_world=no_mpi)


def test_openmpi_single_node_defaults_to_localhost() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }  # mpirun inside sbatch
    assert discover(env, mpi_world=no_mpi) == LaunchInfo(3, 4, 3, 4, "127.0.0.1", 29500, "openmpi")


def test_openmpi_multi_node_needs_master_addr() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    with pytest.raises(LaunchError, match=r"^openmpi launch spans several nodes but MASTER_ADDR is missing"):
        discover(env, mpi_world=no_mpi)
    info = discover({**env, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}, mpi_world=no_mpi)
    assert (info.master_addr, info.master_port, info.local_world_size) == ("head", 4000, 2)


def test_pmi() -> None:
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert discover(env, mpi_world=no_mpi) == LaunchInfo(1, 2, 1, 2, "127.0.0.1", 29500, "pmi")
    with pytest.raises(LaunchError, match=r"pmi launch detected \(PMI_RANK or PMI_SIZE is set\) but MPI_LOCALRANKID"):
        discover({"PMI_RANK": "1", "PMI_SIZE": "2"}, mpi_world=no_mpi)


def test_slurm_first_host_of_compressed_nodelist_and_job_port() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "7",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_TASKS_PER_NODE": "2(x3),1",
        "SLURM_JOB_NODELIST": "gpu[07-09,12]",
        "SLURM_JOB_ID": "4242",
    }
    assert discover(env, mpi_world=no_mpi) == LaunchInfo(5, 7, 1, 2, "gpu07", 29500 + 242, "slurm")


def test_slurm_explicit_master_and_missing_pieces() -> None:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NNODES": "1",
        "MASTER_ADDR": "x",
        "MASTER_PORT": "9",
    }
    assert discover(env, mpi_world=no_mpi) == LaunchInfo(0, 2, 0, 2, "x", 9, "slurm")
    del env["MASTER_ADDR"]
    with pytest.raises(LaunchError, match=r"^slurm launch detected \(SLURM_PROCID is set\) but SLURM_JOB_NODELIST"):
        discover(env, mpi_world=no_mpi)
    with pytest.raises(LaunchError, match=r"but SLURM_LOCALID is missing"):
        discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, mpi_world=no_mpi)


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a-[1-2],b3", ["a-1", "a-2", "b3"]),
        ("solo", ["solo"]),
        ("r[1-2]-g[8-10]", ["r1-g8", "r1-g9", "r1-g10", "r2-g8", "r2-g9", "r2-g10"]),
        ("x[098-100]", ["x098", "x099", "x100"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node[a-b]", "n[3-1]", ""])
def test_malformed_nodelist(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_slurm_tasks_per_node() -> None:
    assert [slurm_tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]


class _FakeComm:
    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size


def test_mpi4py_of_size_one_is_single() -> None:
    assert discover({"PMIX_RANK": "0"}, mpi_world=lambda: _FakeComm(0, 1)).source == "single"


def test_mpi4py_is_not_touched_without_an_mpi_launcher() -> None:
    def boom():
        raise AssertionError("importing mpi4py would initialise MPI in a plain process")

    assert discover({}, mpi_world=boom).source == "single"
