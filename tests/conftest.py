"""Test setup: 8 fake CPU devices (before JAX initialises) and mesh helpers."""

from occult_jax.host_devices import request_cpu_devices

request_cpu_devices(8)  # before JAX initialises its backends

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def mesh_or_skip(expert: int, data: int = 1):
    """oj.make_mesh(expert, data), or skip when fewer devices are present."""
    import occult_jax as oj

    if expert * data > jax.device_count():
        pytest.skip(f"mesh expert={expert} × data={data} needs {expert * data} devices; "
                    f"{jax.device_count()} present")
    return oj.make_mesh(expert=expert, data=data)
