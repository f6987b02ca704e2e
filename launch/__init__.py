"""Rank and device discovery for processes started by mpirun, srun or a spawning parent."""

from trtdist.launch.device import bind_device, cpu_threads_per_rank
from trtdist.launch.env import RankInfo, discover_rank
from trtdist.launch.spawn import SpawnedWorld, join_parent_world, spawn_world

__all__ = ["RankInfo", "SpawnedWorld", "bind_device", "cpu_threads_per_rank", "discover_rank",
           "join_parent_world", "spawn_world"]
