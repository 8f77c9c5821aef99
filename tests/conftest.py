"""Test setup: 8 fake CPU devices (before JAX initialises) and mesh helpers."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def mesh_or_skip(expert: int, data: int = 1):
    """oj.make_mesh(expert, data), or skip when fewer devices are present."""
    import occult_jax as oj

    if expert * data > jax.device_count():
        pytest.skip(f"mesh expert={expert} × data={data} needs {expert * data} devices; "
                    f"{jax.device_count()} present")
    return oj.make_mesh(expert=expert, data=data)
