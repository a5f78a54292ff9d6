"""An upper bound on how full bins of a fixed capacity can be packed with whole samples.

The LP relaxation of bin packing (Gilmore-Gomory), solved by column generation: the master LP
covers every length's demand with fractional packing patterns; a bounded-knapsack dynamic
programme over the capacity prices the next pattern. At the optimum no pattern has reduced cost
below zero, and no integer packing can use fewer bins than the LP's value, so
`total tokens / (ceil(LP) * capacity)` bounds the fill of *any* packing from above. Lengths are
rounded down to a multiple of `quantum` first (smaller samples never pack worse), which keeps the
pattern space small and the bound valid.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linprog  # scipy comes with mlflow


def lp_min_bins(lengths: np.ndarray, capacity: int, *, quantum: int = 8,
                max_iterations: int = 5000) -> float:
    """The LP lower bound on the number of `capacity`-token bins the samples need."""
    sizes, demand = np.unique((np.asarray(lengths) // quantum) * quantum, return_counts=True)
    sizes = np.maximum(sizes, 1)
    most = np.minimum(demand, capacity // sizes)  # copies of a length one bin can hold
    patterns = [np.eye(len(sizes))[i] * most[i] for i in range(len(sizes))]
    for _ in range(max_iterations):
        a = np.array(patterns).T
        res = linprog(np.ones(a.shape[1]), A_ub=-a, b_ub=-demand, bounds=(0, None),
                      method="highs")
        if res.status != 0:
            raise RuntimeError(f"lp_min_bins: the master LP failed: {res.message}")
        price = -res.ineqlin.marginals  # dual value of one sample of each length
        pattern, value = _best_pattern(sizes, most, price, capacity)
        if value <= 1 + 1e-9:  # no pattern lowers the objective: LP optimum
            return float(res.fun)
        patterns.append(pattern)
    raise RuntimeError(f"lp_min_bins: no convergence in {max_iterations} iterations")


def _best_pattern(sizes: np.ndarray, most: np.ndarray, price: np.ndarray,
                  capacity: int) -> tuple[np.ndarray, float]:
    """The bin content of highest total dual price (bounded knapsack, one layer per size)."""
    best = np.zeros(capacity + 1)
    takes = []
    for size, copies, p in zip(sizes.tolist(), most.tolist(), price.tolist(), strict=True):
        layer, take = best.copy(), np.zeros(capacity + 1, dtype=np.int64)
        for k in range(1, int(copies) + 1):
            shifted = np.full(capacity + 1, -np.inf)
            shifted[k * size:] = best[:capacity + 1 - k * size] + k * p
            better = shifted > layer
            layer[better], take[better] = shifted[better], k
        takes.append(take)
        best = layer
    room = int(best.argmax())
    pattern = np.zeros(len(sizes))
    for i in range(len(sizes) - 1, -1, -1):
        pattern[i] = takes[i][room]
        room -= int(takes[i][room]) * int(sizes[i])
    return pattern, float(best.max())


def max_fill(lengths: np.ndarray, capacity: int, **kwargs: int) -> float:
    """Upper bound on real tokens / (bins x capacity) over every packing of whole samples."""
    bins = math.ceil(lp_min_bins(lengths, capacity, **kwargs) - 1e-6)
    return float(np.asarray(lengths).sum()) / (bins * capacity)
