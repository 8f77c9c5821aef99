"""Mesh construction and the shardings the MoE layer uses."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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
