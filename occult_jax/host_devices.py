"""Fake CPU devices, so the expert-parallel path runs on a laptop. Call before JAX initialises
its backends; only the CPU backend reads the flag, so GPU and TPU runs are unaffected."""

import os

FLAG = "xla_force_host_platform_device_count"


def request_cpu_devices(count: int = 8) -> None:
    """Add --xla_force_host_platform_device_count=count to XLA_FLAGS unless already set."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{FLAG}={count}".strip()
