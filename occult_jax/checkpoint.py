"""Orbax checkpoints of (params, optimizer state, step): save every N steps, keep the last K,
restore the newest; and params-only loading for fine-tuning (`config.init_from`).

A checkpoint holds three items: `params` (the model's whole NNX state: Params and the
non-trainable `ExpertPlacement` maps), `opt_state` (the optimizer's state, step count included)
and `meta` (JSON: step and what fixes the data order); a fourth, `counts` (host NumPy arrays:
online placement's co-activation counts since its last re-placement), when there are any.
Arrays restore onto the shardings of the live state.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

ITEMS = ("params", "opt_state", "meta", "counts")


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
                                             item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: nnx.State, opt_state: nnx.State, meta: dict,
             counts: dict[str, np.ndarray] | None = None, force: bool = True) -> bool:
        items = dict(params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
                     opt_state=ocp.args.StandardSave(nnx.to_pure_dict(opt_state)),
                     meta=ocp.args.JsonSave(meta))
        if counts:
            items["counts"] = ocp.args.StandardSave(counts)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, params: nnx.State, opt_state: nnx.State
                ) -> tuple[nnx.State, nnx.State, dict, dict[str, np.ndarray]]:
        """(params, opt_state, meta, counts) of `step`, params and opt_state shaped and sharded
        like the given live states; counts {} when the checkpoint has none."""
        items = dict(params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(params))),
                     opt_state=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_state))),
                     meta=ocp.args.JsonRestore())
        has_counts = os.path.isdir(os.path.join(self.directory, str(step), "counts"))
        if has_counts:
            items["counts"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        nnx.replace_by_pure_dict(params, restored["params"])
        nnx.replace_by_pure_dict(opt_state, restored["opt_state"])
        counts = ({k: np.asarray(v) for k, v in restored["counts"].items()} if has_counts
                  else {})
        return params, opt_state, dict(restored["meta"]), counts

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
    target = _abstract(nnx.to_pure_dict(params))
    manager = None
    if os.path.isdir(os.path.join(path, "params")):  # one step's folder, under any name
        step_name = os.path.basename(path)
        step = int(step_name) if step_name.isdigit() else -1
    else:
        directory = os.path.join(path, "checkpoints")
        directory = directory if os.path.isdir(directory) else path
        manager = ocp.CheckpointManager(directory, item_names=ITEMS)
        step = manager.latest_step()
        if step is None:
            manager.close()
            raise ValueError(f"init_from={path!r} holds no checkpoint.")
    try:
        if manager is None:
            restored = _restore_item(os.path.join(path, "params"), target)
        else:
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target)))["params"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"init_from={path!r} step {step} does not fit this model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the shapes "
                         "of model and moe must match the source run's.") from None
    finally:
        if manager is not None:
            manager.close()
    nnx.replace_by_pure_dict(params, restored)
    return params, step


def _restore_item(item_dir: str, target: Any) -> Any:
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(item_dir, target)
