"""Test setup: 8 fake CPU devices (before JAX initialises) and mesh helpers."""

import contextlib

from occult_jax.host_devices import request_cpu_devices

request_cpu_devices(8)  # before JAX initialises its backends

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: one pytest process runs the whole
    suite, and without this its memory grows past a 24 GiB CI machine's."""
    yield
    jax.clear_caches()


def mesh_or_skip(expert: int, data: int = 1):
    """oj.make_mesh(expert, data), or skip when fewer devices are present."""
    import occult_jax as oj

    if expert * data > jax.device_count():
        pytest.skip(f"mesh expert={expert} × data={data} needs {expert * data} devices; "
                    f"{jax.device_count()} present")
    return oj.make_mesh(expert=expert, data=data)


def mosaic_gpu_calls(fn, args, *, triton: bool = False) -> list[str]:
    """The Mosaic GPU custom calls in jit(fn) exported for CUDA (with ``triton``, Pallas
    Triton calls may appear beside them)."""
    import re

    targets = ["mosaic_gpu", "mosaic_gpu_v2"] + (["__gpu$xla.gpu.triton"] if triton else [])
    text = cuda_module_text(fn, args, targets)
    return re.findall(r"custom_call @(mosaic_gpu\w*)\(", text)


def cuda_module_text(fn, args, custom_call_targets, triton_modules: list | None = None) -> str:
    """StableHLO text of jit(fn) exported for CUDA from this machine (no GPU needed), with the
    kernels' custom calls allowed; skips where this JAX needs a GPU to lower Pallas kernels.
    ``triton_modules``: a list that receives the text of each Triton module lowered."""
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call(t) for t in custom_call_targets]
    try:
        with _verified_triton_modules(triton_modules):
            exported = export.export(jax.jit(fn), platforms=["cuda"],
                                     disabled_checks=checks)(*args)
    except RuntimeError as err:  # JAX 0.11 asks the local device for the GPU's capability
        if "No supported GPU devices" in str(err):
            pytest.skip(f"this JAX cannot lower GPU kernels without a GPU: {err}")
        raise
    return exported.mlir_module()


@contextlib.contextmanager
def _verified_triton_modules(texts: list | None = None):
    """Run MLIR's verifier on every Triton module lowered inside (JAX serialises them
    unverified and the GPU rejects an invalid one only when it compiles it); their text is
    appended to ``texts`` when given."""
    from jax._src.pallas.triton import lowering

    lower = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises MLIRError naming the op and source line
        if texts is not None:
            texts.append(str(result.module))
        return result

    lowering.lower_jaxpr_to_triton_module = lower_and_verify
    try:
        yield
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
