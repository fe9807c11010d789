"""Discover rank, world size and rendezvous address from whichever launcher started us.

Looked up in this order (the first that is present wins; a launcher that is only partly present is an
error naming the missing variables, never a silent fallback to a single process):

1. torchrun / deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
   (``LOCAL_WORLD_SIZE`` from torchrun, ``LOCAL_SIZE`` from deepspeed).
2. Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``.
3. MPICH / Intel MPI (hydra) and other PMI launchers: ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``,
   ``MPI_LOCALNRANKS``.
4. Slurm's ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is the first host
   of ``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set. MPI variables are checked first because
   ``mpirun`` inside a Slurm allocation leaves the allocation's ``SLURM_*`` variables in place.
5. mpi4py, when importable and none of the above is set (asks ``COMM_WORLD`` directly).
6. Nothing at all: one process, rank 0.

``MASTER_PORT`` defaults to 29500 (torchrun's default) outside torchrun; under Slurm it is offset by the
job id so two jobs sharing a node do not collide.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from engine.distributed.nodelist import expand_nodelist
from engine.errors import ConfigError, LaunchError

DEFAULT_MASTER_PORT = 29500
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "openmpi", "pmi", "slurm", "mpi4py" or "single"

    @property
    def distributed(self) -> bool:
        """True when a process group is needed (more than one process)."""
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchError(f"{source}: {name}={raw!r} is not an integer") from None


def _require(env: Mapping[str, str], names: tuple[str, ...], source: str, trigger: str) -> None:
    missing = [n for n in names if n not in env]
    if missing:
        raise LaunchError(
            f"{source} launch detected ({trigger} is set) but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing",
            hint="launch with torchrun, deepspeed, mpirun or srun, or unset the partial variables",
        )


def _port(env: Mapping[str, str], source: str, default: int) -> int:
    port = _int(env, "MASTER_PORT", source) if "MASTER_PORT" in env else default
    if not 0 < port < 65536:
        raise LaunchError(f"{source}: MASTER_PORT={port} is not a TCP port (1..65535)")
    return port


def _checked(info: LaunchInfo) -> LaunchInfo:
    where = f"{info.source} launch"
    if info.world_size < 1:
        raise LaunchError(f"{where}: world size {info.world_size} must be at least 1")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{where}: rank {info.rank} outside [0, world size {info.world_size})")
    if not 1 <= info.local_world_size <= info.world_size:
        raise LaunchError(
            f"{where}: local world size {info.local_world_size} outside [1, world size {info.world_size}]"
        )
    if not 0 <= info.local_rank < info.local_world_size:
        raise LaunchError(
            f"{where}: local rank {info.local_rank} outside [0, local world size {info.local_world_size})"
        )
    return info


def _master_addr(env: Mapping[str, str], source: str, *, all_local: bool) -> str:
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    if all_local:
        return LOCALHOST
    raise LaunchError(
        f"{source} launch spans several nodes but MASTER_ADDR is missing",
        hint="export MASTER_ADDR=<host of rank 0> (and MASTER_PORT) and pass it on: mpirun -x MASTER_ADDR",
    )


def _from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    src = "torchrun"
    _require(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"), src, "RANK or WORLD_SIZE")
    world = _int(env, "WORLD_SIZE", src)
    local_size_var = next((n for n in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if n in env), None)
    # Neither LOCAL_WORLD_SIZE (torchrun) nor LOCAL_SIZE (deepspeed): a hand-set environment; assume one
    # node. local_rank, which device selection needs, is always given.
    local_world = _int(env, local_size_var, src) if local_size_var else world
    return LaunchInfo(
        rank=_int(env, "RANK", src),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", src),
        local_world_size=local_world,
        master_addr=env["MASTER_ADDR"],
        master_port=_port(env, src, DEFAULT_MASTER_PORT),
        source=src,
    )


def _from_mpi_env(env: Mapping[str, str], names: tuple[str, str, str, str], src: str) -> LaunchInfo:
    rank_var, size_var, local_rank_var, local_size_var = names
    _require(env, names, src, f"{rank_var} or {size_var}")
    world = _int(env, size_var, src)
    local_world = _int(env, local_size_var, src)
    return LaunchInfo(
        rank=_int(env, rank_var, src),
        world_size=world,
        local_rank=_int(env, local_rank_var, src),
        local_world_size=local_world,
        master_addr=_master_addr(env, src, all_local=local_world == world),
        master_port=_port(env, src, DEFAULT_MASTER_PORT),
        source=src,
    )


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from ``SLURM_TASKS_PER_NODE``, e.g. ``"2(x3),1"`` = 2, 2, 2, 1."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(f"slurm: SLURM_NODEID={node_id} outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    src = "slurm"
    size_var = "SLURM_NTASKS" if "SLURM_NTASKS" in env or "SLURM_NPROCS" not in env else "SLURM_NPROCS"
    _require(env, ("SLURM_PROCID", size_var, "SLURM_LOCALID"), src, "SLURM_PROCID")
    world = _int(env, size_var, src)
    if "SLURM_TASKS_PER_NODE" in env and "SLURM_NODEID" in env:
        try:
            local_world = slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], _int(env, "SLURM_NODEID", src))
        except ValueError:
            raise LaunchError(f"slurm: cannot parse SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']!r}") from None
    elif "SLURM_NTASKS_PER_NODE" in env:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", src)
    elif env.get("SLURM_NNODES", "1").strip() == "1":
        local_world = world
    else:
        raise LaunchError("slurm launch over several nodes but SLURM_TASKS_PER_NODE and SLURM_NODEID are missing")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        nodelist_var = next((n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in env), None)
        if nodelist_var is None:
            raise LaunchError(
                "slurm launch detected (SLURM_PROCID is set) but SLURM_JOB_NODELIST and MASTER_ADDR are missing",
                hint='export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
            )
        try:
            hosts = expand_nodelist(env[nodelist_var])
        except ValueError as err:
            raise LaunchError(f"slurm: cannot parse {nodelist_var}={env[nodelist_var]!r}: {err}") from None
        addr = hosts[0]
    job_offset = _int(env, "SLURM_JOB_ID", src) % 1000 if "SLURM_JOB_ID" in env else 0
    return LaunchInfo(
        rank=_int(env, "SLURM_PROCID", src),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", src),
        local_world_size=local_world,
        master_addr=addr,
        master_port=_port(env, src, DEFAULT_MASTER_PORT + job_offset),
        source=src,
    )


def mpi4py_world() -> object | None:
    """mpi4py's ``COMM_WORLD`` if mpi4py is installed, else None (importing it initialises MPI)."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    from mpi4py import MPI  # noqa: PLC0415 - optional dependency, imported only when used

    return MPI.COMM_WORLD


def _from_mpi4py(env: Mapping[str, str], comm) -> LaunchInfo:
    from mpi4py import MPI  # noqa: PLC0415

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    # Rank 0's hostname is the rendezvous address; every rank learns it from the broadcast.
    addr = env.get("MASTER_ADDR") or comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
    return LaunchInfo(
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        local_rank=local.Get_rank(),
        local_world_size=local.Get_size(),
        master_addr=addr,
        master_port=_port(env, "mpi4py", DEFAULT_MASTER_PORT),
        source="mpi4py",
    )


_MPI_HINT_PREFIXES = ("PMIX_", "PMI_", "HYDRA_", "HYDI_", "I_MPI_", "MPICH_", "MV2_", "PALS_", "MPI_LOCALRANKID")


def _mpi_launch_hint(env: Mapping[str, str]) -> bool:
    return any(name.startswith(_MPI_HINT_PREFIXES) for name in env)


def discover(
    env: Mapping[str, str] | None = None, *, mpi_world: Callable[[], object | None] = mpi4py_world
) -> LaunchInfo:
    """Rank, world size and rendezvous address of this process (see the module docstring for the order)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _checked(_from_torchrun(env))
    if any(n.startswith("OMPI_COMM_WORLD_") for n in env):
        names = (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        )
        return _checked(_from_mpi_env(env, names, "openmpi"))
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        return _checked(_from_mpi_env(env, ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"), "pmi"))
    if "SLURM_PROCID" in env:
        return _checked(_from_slurm(env))
    # Importing mpi4py initialises MPI (in a plain process Open MPI then starts a singleton daemon), so it is
    # consulted only when the environment shows an MPI launcher that set none of the variables above.
    comm = mpi_world() if _mpi_launch_hint(env) else None
    if comm is not None and comm.Get_size() > 1:
        return _checked(_from_mpi4py(env, comm))
    return LaunchInfo(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr=env.get("MASTER_ADDR", LOCALHOST),
        master_port=_port(env, "single-process", DEFAULT_MASTER_PORT),
        source="single",
    )


def default_backend() -> str:
    """NCCL when CUDA is usable, gloo on CPU. The only place this choice is made."""
    import torch  # noqa: PLC0415 - keep discovery importable without torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(
    info: LaunchInfo, *, backend: str | None = None, timeout_s: float, init_method: str | None = None
) -> str:
    """Join the default process group described by ``info``; returns the backend used.

    ``timeout_s`` bounds every collective (a rank that never arrives fails the job instead of hanging
    it). ``init_method`` defaults to ``tcp://MASTER_ADDR:MASTER_PORT``; tests pass ``file://...``.
    On CUDA the device is set to ``local_rank`` first, as NCCL requires.
    """
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not timeout_s > 0:
        raise ConfigError(f"process-group timeout must be positive, got {timeout_s} s")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = None
    if init_method is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Under torchrun the agent hosts the store and keeps it across restarts (--max-restarts). Its keys
        # from the previous attempt would point gloo at dead peers ("connectFullMesh failed ... Connection
        # refused"), so each attempt gets its own key prefix.
        agent = dist.TCPStore(info.master_addr, info.master_port, info.world_size, False, timeout=timeout)
        store = dist.PrefixStore(f"trident/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
    dist.init_process_group(
        backend=backend,
        init_method=None if store is not None else (init_method or f"tcp://{info.master_addr}:{info.master_port}"),
        store=store,
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )
    return backend


def destroy() -> None:
    """Leave the default process group if this process joined one."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
