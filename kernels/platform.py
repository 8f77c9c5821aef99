"""Where a kernel runs: compiled Mosaic GPU, Mosaic TPU, or the Mosaic GPU interpreter on CPU.

``emulate("tpu")`` makes the library choose its kernels as on a TPU while running on CPU, each
TPU kernel in Pallas' interpreter: how CI tests the TPU path without a TPU."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

SMEM_BYTES = 227 * 1024  # shared memory one thread block may use on Hopper (H100/H200)
# (platform, interpret) that emulate() set, or None
_emulated: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar(
    "occult_jax_emulated_platform", default=None)


def of(device) -> str:
    """'gpu', 'tpu' or 'cpu': a device's platform, or the one ``emulate`` names."""
    emulated = _emulated.get()
    return emulated[0] if emulated else device.platform


def backend() -> str:
    """'gpu', 'tpu' or 'cpu' for the default device (or the one ``emulate`` names)."""
    return of(jax.devices()[0])


def emulated() -> bool:
    """Whether the kernels of another platform (``emulate``) run in Pallas' interpreter here."""
    emulated = _emulated.get()
    return bool(emulated and emulated[1])


@contextlib.contextmanager
def emulate(kind: str, interpret: bool = True) -> Iterator[None]:
    """Choose kernels as on ``kind`` ("tpu") while on CPU, running them interpreted; with
    ``interpret=False`` trace the compiled TPU kernels instead (to export for TPU from here).
    Choices are made when JAX traces: a function traced outside the context keeps the
    kernels it got there, and one traced inside keeps the emulated ones after it."""
    if kind != "tpu" or jax.devices()[0].platform != "cpu":
        raise ValueError(f"emulate runs the TPU kernels on CPU only; got {kind!r} on "
                         f"{jax.devices()[0].platform}")
    token = _emulated.set((kind, interpret))
    try:
        yield
    finally:
        _emulated.reset(token)


def interpret_params():
    """Parameters that run a Mosaic GPU kernel in the CPU interpreter (tests, CI)."""
    try:  # JAX >= 0.10 keeps the GPU interpreter under a private path.
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # pragma: no cover - depends on the JAX version
        raise RuntimeError(
            "this JAX has no Mosaic GPU interpreter; run the Pallas kernels on a GPU "
            "or set expert_matmul to 'ragged_dot'"
        ) from e
    return InterpretGPUParams()


def num_sms(interpret: bool) -> int:
    """SMs to launch a persistent kernel on; 1 when interpreted (the interpreter runs one block)."""
    if interpret:
        return 1
    return int(getattr(jax.devices()[0], "core_count", 132) or 132)


def warp_specialized_kernel(body, out_type: jax.ShapeDtypeStruct | tuple, *, interpret: bool):
    """A persistent Mosaic GPU kernel: one block per SM (axis "sm"), three warpgroups (axis
    "wg": two compute, one memory), warpgroup semantics; interpreted on CPU.

    ``out_type=()``: a kernel that only writes ``jax.Ref`` operands in place (no outputs)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
    if out_type == ():  # plgpu.kernel's batching wrapper cannot take Ref operands
        mesh = plgpu.Mesh(grid=(num_sms(interpret),), grid_names=("sm",), num_threads=3,
                          thread_name="wg")
        return pl.kernel(body, out_type=(), mesh=mesh, compiler_params=params,
                         interpret=interpret_params() if interpret else False)
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(num_sms(interpret),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=params,
        interpret=interpret_params() if interpret else False,
    )


def varying_axes(x: jax.Array) -> frozenset:
    """The shard_map axes x varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # pragma: no cover - older JAX


def vary_like(value: jax.Array, *refs: jax.Array) -> jax.Array:
    """Give a value the shard_map variance of its operands (a no-op outside shard_map).

    Pallas outputs and fresh constants carry no manual-axis variance. ``jax.lax.pcast`` marks
    them varying without touching the data (its transpose is the psum a gradient needs); JAX
    versions without it fall back to adding the operands' empty sums (exactly 0), which costs
    one elementwise pass unless XLA folds it.
    """
    want = frozenset().union(*(varying_axes(r) for r in refs))
    missing = tuple(sorted(want - varying_axes(value)))
    if not missing:
        return value
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(value, missing, to="varying")
    return _add_empty_sums(value, refs)  # pragma: no cover - older JAX


def vary_together(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Each array widened to vary over every mesh axis any of them varies over (the Pallas
    interpreter's slices need operands of one variance inside shard_map)."""
    return tuple(vary_like(a, *arrays) for a in arrays)


def out_struct(shape: tuple[int, ...], dtype, *operands: jax.Array) -> jax.ShapeDtypeStruct:
    """A pallas_call output type that varies over the mesh axes its operands vary over (inside
    shard_map, where the call's output types must say so); a plain struct elsewhere."""
    varying = frozenset().union(*(varying_axes(o) for o in operands))
    if not hasattr(jax.sharding, "ManualAxisType"):  # pragma: no cover - older JAX
        return jax.ShapeDtypeStruct(shape, dtype)
    mat = jax.sharding.ManualAxisType(varying=varying)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _add_empty_sums(value: jax.Array, refs) -> jax.Array:
    for ref in refs:
        value = value + ref[:0].sum().astype(value.dtype)
    return value
