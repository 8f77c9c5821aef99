"""Expert placement: put experts that are chosen together on the same device.

A placement is an expert→device map `[E]` with exactly E/N experts per device. Its cost on a
routing trace `expert_ids [T, k]` is C_T, the mean number of distinct devices among a token's k
experts (Occult, Luo et al. 2025): each device a token visits costs one exchange row. From an
E×E co-activation matrix M (M[i, j] = tokens that chose both i and j) the pairwise cost is
1 + (co-activation mass between experts on different devices) / (total mass), exactly C_T for
top-2 routing and a proxy for k > 2.

Methods: "identity" (expert e on device e // (E/N)), "greedy" (the paper's algorithm) and
"best" (balanced METIS partition, greedy, identity and random starts, each improved by pair swaps
on the exact objective; the best candidate wins). CLI: `python -m occult_jax.placement --help`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from occult_jax import routing

METHODS = ("identity", "greedy", "best")
KINDS = ("matrix", "trace")


def collaboration_cost(expert_ids: Any, expert_to_device: Any) -> float:
    """C_T: mean over tokens of the number of distinct devices among the token's experts."""
    devices = np.asarray(expert_to_device)
    if devices.ndim != 1:
        raise ValueError(f"expert_to_device must be 1-D [E]; got shape {devices.shape}.")
    ids = _check_trace(expert_ids, devices.shape[0], distinct=False,
                       hint="give expert_to_device one entry per expert")
    on = np.sort(devices[ids], axis=1)
    return float(1.0 + np.mean(np.sum(on[:, 1:] != on[:, :-1], axis=1)))


def pairwise_cost(coact: Any, expert_to_device: Any) -> float:
    """1 + fraction of co-activation mass between experts on different devices (C_T for top-2)."""
    m, devices = np.asarray(coact, np.float64), np.asarray(expert_to_device)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or devices.shape != (m.shape[0],):
        raise ValueError(f"pairwise_cost needs an [E, E] matrix and an [E] expert_to_device map; "
                         f"got shapes {m.shape} and {devices.shape}.")
    off = (devices[:, None] != devices[None, :]) & ~np.eye(len(devices), dtype=bool)
    total = m.sum() - np.trace(m)
    return 1.0 if total == 0 else float(1.0 + (m * off).sum() / total)


def lower_bound(num_experts: int, top_k: int, num_devices: int) -> int:
    """ceil(k·N/E): a token's k experts need at least that many devices of E/N experts each."""
    _per_device(num_experts, num_devices)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must lie in 1..num_experts={num_experts}.")
    return -(-top_k * num_devices // num_experts)


def coactivation(expert_ids: Any, num_experts: int) -> np.ndarray:
    """[T, k] ids → [E, E] int64 counts of tokens that chose both i and j (zero diagonal)."""
    ids = _check_trace(expert_ids, num_experts).astype(np.int64)
    e = num_experts
    flat = np.zeros(e * e, np.int64)
    for a, b in itertools.combinations(range(ids.shape[1]), 2):
        flat += np.bincount(ids[:, a] * e + ids[:, b], minlength=e * e)
    upper = flat.reshape(e, e)
    return upper + upper.T


def coactivation_jax(expert_ids: Any, num_experts: int) -> Any:
    """Jit-traceable twin of `coactivation`: one-hot matmul minus its diagonal, int32 [E, E]."""
    return routing.coactivation(expert_ids, num_experts)


def place(stats: Any, num_devices: int, method: str = "best", *, seed: int = 0,
          kind: str | None = None, num_experts: int | None = None, max_tokens: int = 20_000,
          restarts: int = 4) -> np.ndarray:
    """Expert→device map [E] (int32, E/N experts per device) for one layer's routing statistics.

    stats: a routing trace [T, k] of integer expert ids, or a co-activation matrix [E, E].
      Unless `kind` ("trace" | "matrix") says which, a 2-D array is a matrix when it is floating
      point, or square and symmetric (its diagonal, e.g. loads in X.T @ X, is ignored); anything
      else is a trace. (A trace is square and symmetric only in contrived cases such as
      [[0, 1], [1, 0]]: pass kind="trace".)
    method: "identity", "greedy" (the paper) or "best" (never worse than either on its
      objective: exact C_T over the whole trace, or the pairwise cost for a matrix).
    num_experts: E for a trace (default: largest id + 1). max_tokens: the swap search of
      "best" runs on a random sample of this many tokens. restarts: extra random starts.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    m, trace = _resolve(stats, kind, num_experts)
    e = m.shape[0]
    try:
        per = _per_device(e, num_devices)
    except ValueError as err:
        if trace is None or num_experts is not None:
            raise
        raise ValueError(f"{err} (E was inferred from the trace's largest id; pass "
                         f"num_experts.)") from None
    identity = np.arange(e, dtype=np.int32) // per
    if method == "identity" or per == 1 or num_devices == 1:  # the last two: all maps cost alike
        return identity
    if method == "greedy":
        return _greedy(m, num_devices)
    rng = np.random.default_rng(seed)
    sample = None
    if trace is not None:
        sample = trace if len(trace) <= max_tokens else trace[
            np.sort(rng.choice(len(trace), max_tokens, replace=False))]
    raw = [identity, _greedy(m, num_devices)]
    starts = [*raw, _metis(m, num_devices, seed)]
    starts += [rng.permutation(identity) for _ in range(restarts)]
    candidates = []
    for start in starts:
        dev = _swap_search_cut(m, start, num_devices)
        if sample is not None:
            dev = _swap_search_trace(sample, dev, num_devices)
        candidates.append(dev)
    candidates += raw  # on the full data the searched maps could lose to a raw one (sampling)
    if trace is not None:
        costs = [collaboration_cost(trace, dev) for dev in candidates]
    else:
        costs = [pairwise_cost(m, dev) for dev in candidates]
    return candidates[int(np.argmin(costs))].astype(np.int32)


def brute_force(coact: Any, num_devices: int, *, max_partitions: int = 1_000_000) -> np.ndarray:
    """Exact minimiser [E] of the pairwise cost: every balanced partition, up to device labels."""
    m = np.asarray(coact, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"coact must be a square [E, E] matrix; got shape {m.shape}.")
    e = m.shape[0]
    per = _per_device(e, num_devices)
    count = math.factorial(e) // (math.factorial(per) ** num_devices
                                  * math.factorial(num_devices))
    if count > max_partitions:
        raise ValueError(f"E={e} on {num_devices} devices has {count} balanced partitions, more "
                         f"than max_partitions={max_partitions}; use place(..., 'best').")

    def groups(rest: tuple[int, ...]):
        if not rest:
            yield ()
            return
        for combo in itertools.combinations(rest[1:], per - 1):
            left = tuple(x for x in rest[1:] if x not in combo)
            for tail in groups(left):
                yield ((rest[0], *combo), *tail)

    maps = np.empty((count, e), np.int32)
    for row, part in enumerate(groups(tuple(range(e)))):
        for device, members in enumerate(part):
            maps[row, list(members)] = device
    cuts = np.concatenate([
        np.einsum("bij,ij->b", chunk[:, :, None] != chunk[:, None, :], m)
        for chunk in np.array_split(maps, max(1, count // 4096))])
    return maps[int(np.argmin(cuts))]


# ----------------------------------------------------------------------------- internals


def _per_device(num_experts: int, num_devices: int) -> int:
    if not isinstance(num_devices, int | np.integer) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int; got {num_devices!r}.")
    if num_experts % num_devices:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(f"num_devices={num_devices} must divide the {num_experts} experts "
                         f"evenly; use one of {divisors}.")
    return num_experts // num_devices


def _check_trace(expert_ids: Any, num_experts: int, distinct: bool = True,
                 hint: str = "pass num_experts for a larger E") -> np.ndarray:
    ids = np.asarray(expert_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"expert_ids must be a non-empty [T, k] trace; got shape {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must hold integer expert ids; got dtype {ids.dtype} "
                         f"(for a co-activation matrix pass kind='matrix').")
    if ids.min() < 0 or ids.max() >= num_experts:
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1}; got "
                         f"{ids.min()}..{ids.max()} ({hint}).")
    if distinct and ids.shape[1] > 1:
        ordered = np.sort(ids, axis=1)
        repeats = np.nonzero(np.any(ordered[:, 1:] == ordered[:, :-1], axis=1))[0]
        if repeats.size:
            raise ValueError(f"token {repeats[0]} repeats an expert ({ids[repeats[0]].tolist()}); "
                             f"each token's top-k ids must be distinct.")
    return ids


def _looks_like_matrix(a: np.ndarray) -> bool:
    """Floating point, or square and symmetric (any diagonal: X.T @ X holds loads there)."""
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        return False
    return bool(np.issubdtype(a.dtype, np.floating) or np.array_equal(a, a.T))


def _resolve(stats: Any, kind: str | None, num_experts: int | None):
    """(co-activation matrix float64 [E, E] with zero diagonal, trace [T, k] or None)."""
    a = np.asarray(stats)
    if kind not in (None, *KINDS):
        raise ValueError(f"kind={kind!r} is unknown; use 'matrix', 'trace' or None (detect).")
    if a.ndim != 2:
        raise ValueError(f"stats must be a [T, k] trace or an [E, E] co-activation matrix; got "
                         f"shape {a.shape} (for a per-layer stack, call place once per layer).")
    if a.size == 0:
        raise ValueError(f"stats is empty (shape {a.shape}); give a non-empty [T, k] trace or "
                         f"[E, E] co-activation matrix.")
    if (kind or ("matrix" if _looks_like_matrix(a) else "trace")) == "trace":
        e = int(np.max(a)) + 1 if num_experts is None else num_experts
        trace = _check_trace(a, e)
        return coactivation(trace, e).astype(np.float64), trace
    if a.shape[0] != a.shape[1] or (num_experts is not None and num_experts != a.shape[0]):
        raise ValueError(f"a co-activation matrix must be [E, E] (E={num_experts}); got shape "
                         f"{a.shape}.")
    m = a.astype(np.float64)
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("a co-activation matrix must be finite and non-negative.")
    if not np.allclose(m, m.T):
        raise ValueError("the co-activation matrix is not symmetric; pass (M + M.T) / 2, or "
                         "kind='trace' if this is a routing trace.")
    np.fill_diagonal(m, 0.0)
    return (m + m.T) / 2, None


def _greedy(m: np.ndarray, n: int) -> np.ndarray:
    """The paper's greedy: seed device 0 with the most co-activated pair, grow each device by
    the unplaced expert of highest mean co-activation with it, seed each next device with the
    unplaced expert least co-activated with all placed ones (ties: lowest index)."""
    e = m.shape[0]
    per = e // n
    dev = np.full(e, -1, np.int32)
    rows, cols = np.triu_indices(e, 1)
    top = int(np.argmax(m[rows, cols]))
    for device in range(n):
        if device == 0:
            members = [int(rows[top]), int(cols[top])]
        else:
            placed = dev >= 0
            members = [int(np.argmin(np.where(placed, np.inf, m[:, placed].sum(axis=1))))]
        dev[members] = device
        while len(members) < per:
            score = np.where(dev >= 0, -np.inf, m[:, members].mean(axis=1))
            members.append(int(np.argmax(score)))
            dev[members[-1]] = device
    return dev


def _metis(m: np.ndarray, n: int, seed: int) -> np.ndarray:
    """pymetis k-way partition of the co-activation graph, repaired to exactly E/N per part."""
    import pymetis

    e = m.shape[0]
    if m.max() <= 0:
        return np.arange(e, dtype=np.int32) // (e // n)
    weights = np.rint(m * (max(1, 2**30 // (e * e)) / m.max())).astype(np.int64)  # METIS: ints
    starts, adjacent, eweights = [0], [], []
    for i in range(e):
        nbrs = np.nonzero(weights[i])[0]
        adjacent += nbrs.tolist()
        eweights += weights[i, nbrs].tolist()
        starts.append(len(adjacent))
    options = pymetis.Options(seed=seed, ufactor=1)
    if hasattr(pymetis, "CSRAdjacency"):
        graph = {"adjacency": pymetis.CSRAdjacency(starts, adjacent)}
    else:  # pymetis < 2025.2
        graph = {"xadj": starts, "adjncy": adjacent}
    _, parts = pymetis.part_graph(n, **graph, eweights=eweights, options=options)
    return _rebalance(m, np.asarray(parts, np.int32), n)


def _rebalance(m: np.ndarray, dev: np.ndarray, n: int) -> np.ndarray:
    """Move the cheapest experts (least cut added) from over-full to under-full devices."""
    e, per, dev = m.shape[0], m.shape[0] // n, dev.copy()
    while True:
        sizes = np.bincount(dev, minlength=n)
        if np.all(sizes == per):
            return dev
        w = m @ np.eye(n)[dev]  # [E, N]: co-activation of each expert with each device
        cost = w[np.arange(e), dev][:, None] - w
        cost[sizes[dev] <= per] = np.inf
        cost[:, sizes >= per] = np.inf
        x, d = np.unravel_index(int(np.argmin(cost)), cost.shape)
        dev[x] = d


def _swap_search_cut(m: np.ndarray, dev: np.ndarray, n: int) -> np.ndarray:
    """Steepest-descent pair swaps on the pairwise cut until no swap lowers it."""
    dev, tol = dev.copy(), 1e-9 * max(m.sum(), 1.0)
    for _ in range(4 * m.shape[0] ** 2):
        w = m @ np.eye(n)[dev]
        g = w[np.arange(len(dev)), dev][:, None] - w  # g[a, d]: cut added by moving a to d
        delta = g[:, dev] + g[:, dev].T + 2 * m  # swap a↔b keeps their own edge cut
        delta[dev[:, None] == dev[None, :]] = np.inf
        a, b = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if delta[a, b] >= -tol:
            break
        dev[a], dev[b] = dev[b], dev[a]
    return dev


def _swap_search_trace(trace: np.ndarray, dev: np.ndarray, n: int) -> np.ndarray:
    """Steepest-descent pair swaps on the exact sum over tokens of distinct devices.

    With c [T, N] a token's experts per device, moving expert a alone from p to d changes the
    token's device count by [c_d = 0] - [c_p = 1]; a swap a↔b sums both moves and adds back
    [c_p = 1] + [c_q = 1] for tokens holding both (for them nothing changes). All in matmuls.
    """
    t, e = trace.shape[0], len(dev)
    x = np.zeros((t, e), np.float32)
    x[np.arange(t)[:, None], trace] = 1.0
    dev = dev.copy()
    c = x @ np.eye(n, dtype=np.float32)[dev]
    for _ in range(4 * e * e):
        alone = x * (c[:, dev] == 1)  # [T, E]: token's only expert on that expert's device
        move = x.T @ (c == 0).astype(np.float32) - alone.sum(axis=0)[:, None]  # [E, N]
        both = alone.T @ x
        delta = move[:, dev] + move[:, dev].T + both + both.T
        delta[dev[:, None] == dev[None, :]] = np.inf
        a, b = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if delta[a, b] > -0.5:  # integer-valued: no swap removes a device visit
            break
        p, q = dev[a], dev[b]
        c[:, p] += x[:, b] - x[:, a]
        c[:, q] += x[:, a] - x[:, b]
        dev[a], dev[b] = q, p
    return dev


if __name__ == "__main__":
    from occult_jax.placement_cli import main

    raise SystemExit(main())
