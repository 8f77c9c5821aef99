"""Training metrics: MoE summaries, and one writer for console, metrics.jsonl and TensorBoard.

Console: a tqdm progress bar whose postfix carries the latest numbers, plus one line per eval.
Files (process 0 only): `workdir/metrics.jsonl`, one JSON object per logged step (always `step`
and `loss`; per-MoE-layer values are lists in layer order), and TensorBoard event files under
`workdir/tb` written with tensorboardX (per-layer values as `name/layer{i}`, i the model layer;
metrics.jsonl's `moe_layers` lists those indices).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import tqdm

MOE_KEYS = ("ct", "wire_bytes", "dropped", "imbalance", "aux_loss", "z_loss")


def summarize_moe(steps: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Stacked per-layer MoE stats ([L, ...] arrays) of each step of a logging window →
    per-layer lists of plain floats.

    `dropped` is the window's total (no overflow goes unreported); the other values are means
    over its steps. imbalance is max/mean of the expert load (1.0 is perfect balance).
    """
    if not steps or not steps[0]:
        return {}

    def per_step(key):
        return np.stack([np.asarray(s[key], np.float64).reshape(-1) for s in steps])

    load = np.stack([np.asarray(s["expert_load"], np.float64) for s in steps])  # [S, L, E]
    imbalance = load.max(axis=-1) / np.maximum(load.mean(axis=-1), 1e-9)
    out = {"imbalance": imbalance.mean(axis=0).tolist(),
           "dropped": per_step("dropped").sum(axis=0).tolist()}
    for key in ("ct", "wire_bytes", "aux_loss", "z_loss"):
        out[key] = per_step(key).mean(axis=0).tolist()
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, int)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricWriter:
    """Writes logged steps everywhere; a no-op on processes other than 0 (except the bar)."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True, moe_layers: list[int] | None = None):
        self.enabled = enabled
        self.moe_layers = moe_layers  # model layer index of each per-layer value
        self.bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train",
                             disable=not (enabled and progress), dynamic_ncols=True,
                             mininterval=1.0, unit="step")
        self.jsonl = None
        self.tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_records_after(path, start_step)
            self.jsonl = open(path, "a")
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: console and jsonl still work
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        """One logged step: a jsonl line, TensorBoard scalars and the bar's postfix."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in scalars.items():
                if key == "moe_layers":
                    continue
                if isinstance(value, (list, tuple)):
                    names = self.moe_layers or range(len(value))
                    for i, v in zip(names, value, strict=False):
                        self.tb.add_scalar(f"{key}/layer{i}", float(v), step)
                else:
                    self.tb.add_scalar(key, float(value), step)
        postfix = {k: _short(scalars[k]) for k in ("loss", "val_loss", "tokens_per_s", "ct")
                   if k in scalars}
        self.bar.set_postfix(postfix, refresh=False)

    def print(self, message: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = float(np.mean(value)) if value else float("nan")
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _drop_records_after(path: str, step: int) -> None:
    """Keeps the records up to `step` (the checkpoint a run resumes from): a run killed after
    its last checkpoint logged steps that the resumed run logs again."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl (for tests and notebooks)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
