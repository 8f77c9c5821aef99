"""Mesh construction and the shardings the MoE layer uses."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kernels import platform as kernel_platform

EXPERT = "expert"
DATA = "data"


def compute_capability(device) -> str:
    """A GPU's compute capability ("9.0" on Hopper); "" for other devices."""
    return str(getattr(device, "compute_capability", "") or "")


def make_mesh(expert: int | None = None, data: int = 1, devices=None) -> Mesh:
    """A ("data", "expert") mesh with Auto axes, so shard_map in_specs are real shardings.

    `expert=None` takes every device that `data` leaves. The expert axis is the inner one, so an
    expert-parallel group sits on neighbouring devices (one NVLink domain, one TPU slice row).
    """
    devices = list(jax.devices() if devices is None else devices)
    if expert is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide the {len(devices)} devices; "
                             "pass a data size that divides the device count.")
        expert = len(devices) // data
    if expert < 1 or data < 1:
        raise ValueError(f"mesh sizes must be >= 1, got expert={expert}, data={data}.")
    if expert * data > len(devices):
        raise ValueError(f"a mesh of expert={expert} × data={data} needs {expert * data} devices, "
                         f"but {len(devices)} are present; shrink the mesh.")
    grid = np.asarray(devices[: expert * data]).reshape(data, expert)
    return Mesh(grid, (DATA, EXPERT), axis_types=(AxisType.Auto, AxisType.Auto))


def token_spec(mesh: Mesh) -> PartitionSpec:
    """Tokens (the leading axis of a [tokens, d] array) are sharded over every mesh axis."""
    return PartitionSpec(tuple(mesh.axis_names))


def expert_spec(expert_axis: str = EXPERT) -> PartitionSpec:
    """Stacked expert weights [E, ...] are sharded over the expert axis, replicated elsewhere."""
    return PartitionSpec(expert_axis)


def sharding(mesh: Mesh, spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(mesh, spec)


def expert_axis_hosts(devices: np.ndarray, axis_index: int) -> int:
    """Most distinct processes among the devices of one expert-axis group of a mesh array."""
    groups = np.moveaxis(np.asarray(devices), axis_index, -1).reshape(-1, devices.shape[axis_index])
    return max(len({d.process_index for d in group}) for group in groups)


def mesh_facts(expert_axis: str, mesh: Mesh) -> dict:
    """What ``config.validate_for_mesh`` needs to know of a built mesh: the platform its
    kernels are chosen for (``kernels.platform.of``), the most processes one expert-axis group
    spans, the GPUs' compute capability."""
    names = list(mesh.axis_names)
    hosts = expert_axis_hosts(mesh.devices, names.index(expert_axis)) if expert_axis in names else 1
    device = mesh.devices.flat[0]
    return {"platform": kernel_platform.of(device), "expert_axis_hosts": hosts,
            "gpu_capability": compute_capability(device)}
