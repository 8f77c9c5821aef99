"""The training job's processes: multi-host start-up, and SIGTERM/SIGINT as a flag that every
host agrees on (so a preempted run checkpoints, then stops)."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-host job.

    Recognised: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), a SLURM
    job step of more than one task (`SLURM_STEP_NUM_TASKS`, set by `srun`; a batch script run
    without `srun` sees only the allocation's `SLURM_NTASKS` and is one process), Open MPI
    (`OMPI_COMM_WORLD_SIZE` > 1) and multi-host Cloud TPU (`TPU_WORKER_HOSTNAMES` listing
    several hosts). JAX auto-detects the cluster from the same variables. Every host runs the
    same command; each feeds its part of the global batch, and only process 0 writes logs
    (checkpoints are written collectively). Must run before anything touches a JAX device;
    single-host runs skip it.
    """
    env = os.environ
    multi = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
             or int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
    if not multi or jax.distributed.is_initialized():
        return False
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls (save, then stop); a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, step: int, every: int) -> bool:
        """The flag, agreed by all hosts (polled every `every` steps on multi-host runs, since a
        signal may reach only some hosts and the checkpoint save is collective)."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
