"""Orbax checkpoints of (params, optimizer state, step): save every N steps, keep the last K,
restore the newest; and params-only loading for fine-tuning (`config.init_from`).

A checkpoint holds three items: `params` (the model's whole NNX state: Params and the
non-trainable `ExpertPlacement` maps), `opt_state` (the optimizer's state, step count included)
and `meta` (JSON: step, data seed). Arrays restore onto the shardings of the live state.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _abstract(pure: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), pure)


class Checkpointer:
    """`CheckpointManager` over `directory` for one run's (params, opt_state) states."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: nnx.State, opt_state: nnx.State, meta: dict,
             force: bool = True) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(nnx.to_pure_dict(opt_state)),
            meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, params: nnx.State, opt_state: nnx.State
                ) -> tuple[nnx.State, nnx.State, dict]:
        """(params, opt_state, meta) of `step`, shaped and sharded like the given live states."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(params))),
            opt_state=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_state))),
            meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        nnx.replace_by_pure_dict(params, restored["params"])
        nnx.replace_by_pure_dict(opt_state, restored["opt_state"])
        return params, opt_state, dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(path: str, params: nnx.State) -> tuple[nnx.State, int]:
    """Params (and placement maps) from a run directory's newest checkpoint, or a step folder.

    `path` is a workdir (its `checkpoints/` is searched), a checkpoints folder, or one step's
    folder. Returns (params, step). Raises a one-line ValueError when nothing is there.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"init_from={path!r} does not exist; give a run's workdir or a "
                         "checkpoint step folder.")
    if os.path.isdir(os.path.join(path, "params")):  # one step's folder
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    else:
        directory = os.path.join(path, "checkpoints")
        directory = directory if os.path.isdir(directory) else path
        step = None
    manager = ocp.CheckpointManager(directory, item_names=("params", "opt_state", "meta"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"init_from={path!r} holds no checkpoint.")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(params)))))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"init_from={path!r} step {step} does not fit this model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the shapes "
                         "of model and moe must match the source run's.") from None
    finally:
        manager.close()
    nnx.replace_by_pure_dict(params, restored["params"])
    return params, step
