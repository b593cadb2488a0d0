"""Channel permutation search for N:M sparsity: which order of a layer's input channels keeps the most magnitude.

N:M sparsity keeps the N largest of every M consecutive input channels of each output row (apex's layout: a conv's
kernel positions are rows too). Which channels share a group of M is an accident of their order, and the channels
can be put in any order if the layer producing them is permuted the same way (fxsparse.index_map): the function
does not change. This module finds a good order.

The objective is over the row-concatenation of every N:M consumer of the channels: ``kept(A, perm)`` is the sum,
over rows and groups of M, of the N largest ``|a|`` of each group. It is improved by *column swaps*: swapping a
column of group g with a column of group h changes those two groups only, and what group g keeps with its slot i
replaced by column x is ``P + max(T, x)`` per row, where P is the sum of the N-1 largest of the other M-1 entries and
T the N-th largest of them. So the gain of every swap in a window of W columns is one [W, W] table of row sums,
updated in place after each swap (only two columns and two groups change), and the search takes the best swap until
none gains, then kicks the order with a few random swaps and descends again (iterated local search), keeping the
best order seen. Everything is counted in steps, not seconds, so a seed
gives the same permutation on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SearchResult:
    permutation: torch.Tensor  # new column j holds old column permutation[j]
    kept_before: float
    kept_after: float
    bound: float  # every row keeping its N/M largest entries, ignoring groups

    @property
    def efficacy(self) -> float:
        """Share of the gap between plain N:M and the bound that the permutation closes (apex's figure)."""
        gap = self.bound - self.kept_before
        return (self.kept_after - self.kept_before) / gap if gap > 0 else 1.0


def nm_kept(values: torch.Tensor, n: int, m: int) -> float:
    """Magnitude kept by N:M pruning along the columns of ``values`` (already absolute, [rows, columns])."""
    rows, columns = values.shape
    return float(values.reshape(rows, columns // m, m).topk(n, dim=-1).values.sum())


def row_bound(values: torch.Tensor, n: int, m: int) -> float:
    """Magnitude kept if each row kept its ``columns * n / m`` largest entries anywhere (no group constraint)."""
    keep = values.shape[1] * n // m
    return float(values.topk(keep, dim=1).values.sum())


class _Window:
    """The swap gains of a window of columns ([rows, W]), kept up to date as swaps are made: a swap changes two
    columns and two groups, so only their rows and columns of the gain table are recomputed."""

    def __init__(self, values: torch.Tensor, n: int, m: int):
        self.values, self.n, self.m = values.clone(), n, m
        rows, width = values.shape
        self.group_of = torch.arange(width) // m
        self.same_group = self.group_of[:, None] == self.group_of[None, :]
        self.partial = torch.empty(rows, width)  # per slot: sum of the n-1 largest other entries of its group
        self.threshold = torch.empty(rows, width)  # per slot: the n-th largest other entry of its group
        self.kept = torch.empty(width // m)  # per group, summed over rows
        self._update_groups(torch.arange(width // m))
        self.replaced = torch.maximum(self.threshold.T[:, :, None], self.values[None, :, :]).sum(1)

    def _update_groups(self, groups: torch.Tensor) -> None:
        m, n = self.m, self.n
        slots = (groups[:, None] * m + torch.arange(m)).flatten()
        block = self.values[:, slots].reshape(-1, len(groups), m)
        others = torch.stack([torch.cat([block[..., :i], block[..., i + 1:]], dim=-1) for i in range(m)], dim=2)
        others = others.sort(dim=-1, descending=True).values  # [rows, groups, m, m-1]
        self.partial[:, slots] = others[..., : n - 1].sum(-1).reshape(-1, len(slots))
        self.threshold[:, slots] = others[..., n - 1].reshape(-1, len(slots))
        self.kept[groups] = block.topk(n, dim=-1).values.sum(-1).sum(0)

    def gains(self) -> torch.Tensor:
        """[W, W]: how much more is kept after swapping column a with column b."""
        gain_a = self.partial.sum(0)[:, None] + self.replaced - self.kept[self.group_of][:, None]
        gains = gain_a + gain_a.T
        gains[self.same_group] = 0.0  # a swap within a group changes nothing
        return gains

    def swap(self, a: int, b: int) -> None:
        self.values[:, [a, b]] = self.values[:, [b, a]]
        groups = torch.unique(self.group_of[[a, b]])
        self._update_groups(groups)
        slots = (groups[:, None] * self.m + torch.arange(self.m)).flatten()
        self.replaced[slots] = torch.maximum(self.threshold[:, slots].T[:, :, None], self.values[None, :, :]).sum(1)
        self.replaced[:, [a, b]] = torch.maximum(self.threshold.T[:, :, None],
                                                 self.values[:, [a, b]][None, :, :]).sum(1)


def _disjoint_best_swaps(gains: torch.Tensor, group_of: torch.Tensor, tolerance: float) -> list[tuple[int, int]]:
    """Gaining swaps, best first, no two touching the same group: their gains add up exactly."""
    width = len(group_of)
    upper = torch.triu(gains, diagonal=1)
    candidates = torch.nonzero(upper > tolerance)
    if not len(candidates):
        return []
    order = torch.argsort(upper[candidates[:, 0], candidates[:, 1]], descending=True)
    used = torch.zeros(width // int((group_of == 0).sum()), dtype=torch.bool)
    swaps = []
    for a, b in candidates[order].tolist():
        ga, gb = int(group_of[a]), int(group_of[b])
        if not (used[ga] or used[gb]):
            used[ga] = used[gb] = True
            swaps.append((a, b))
    return swaps


_WINDOW_WORK = 2**23  # rows x window^2 of one gain table
_MAX_ROUNDS = 2  # random window partitions per descent: most of the gain comes in the first


def _descend(values: torch.Tensor, order: torch.Tensor, n: int, m: int, window: int,
             generator: torch.Generator) -> torch.Tensor:
    """Best-swap descent to a local optimum, in windows of ``window`` columns: all columns at once when they fit,
    else rounds over random partitions into windows until a round gains nothing."""
    columns = values.shape[1]
    order = order.clone()
    tolerance = 1e-6 * max(1.0, float(values.mean()))
    for _ in range(_MAX_ROUNDS):
        if window >= columns:
            partition = [torch.arange(columns)]
        else:
            groups = torch.randperm(columns // m, generator=generator).reshape(-1, window // m)
            partition = [(g[:, None] * m + torch.arange(m)).flatten() for g in groups]
        improved = False
        for picked in partition:
            state = _Window(values[:, order[picked]], n, m)
            for _ in range(len(picked)):
                swaps = _disjoint_best_swaps(state.gains(), state.group_of, tolerance)
                if not swaps:
                    break
                for a, b in swaps:  # swaps on disjoint groups: each gains exactly what the table says
                    state.swap(a, b)
                    i, j = picked[a], picked[b]
                    order[i], order[j] = order[j].clone(), order[i].clone()
                improved = True
        if not improved or window >= columns:
            break
    return order


def search_permutation(values: torch.Tensor, n: int = 2, m: int = 4, seed: int = 0, kicks: int | None = None,
                       window: int | None = None) -> SearchResult:
    """A column order of ``values`` ([rows, columns], columns a multiple of m) that keeps more magnitude under N:M
    pruning. ``kicks``: restarts of the local search from a perturbed best order (default: more for small
    problems, fewer for large ones); ``window``: columns whose swaps are weighed at once (default: as many as keep
    one gain table under ``_WINDOW_WORK`` row-column products, for a conv's thousands of rows fewer)."""
    values = values.detach().abs().float()
    rows, columns = values.shape
    generator = torch.Generator().manual_seed(seed)
    identity = torch.arange(columns)
    before = nm_kept(values, n, m)
    bound = row_bound(values, n, m)
    if n >= m or columns <= m:
        return SearchResult(identity, before, before, bound)
    if window is None:
        window = columns
        while window > 4 * m and rows * window * window > _WINDOW_WORK and window % 2 == 0 and (window // 2) % m == 0:
            window //= 2
    window = max(m, min(window - window % m, columns))
    if columns % window:  # windows must tile the columns: fall back to one window of everything
        window = columns
    if kicks is None:  # about the same work for every size: small problems get more restarts
        kicks = min(30, int(1.5e7 / (rows * columns * window)))
    best = _descend(values, identity, n, m, window, generator)
    best_kept = nm_kept(values[:, best], n, m)
    for _ in range(kicks):
        kicked = best.clone()
        strength = max(2, columns // 16)
        a = torch.randint(0, columns, (strength,), generator=generator)
        b = torch.randint(0, columns, (strength,), generator=generator)
        for i, j in zip(a.tolist(), b.tolist()):
            kicked[i], kicked[j] = kicked[j].clone(), kicked[i].clone()
        candidate = _descend(values, kicked, n, m, window, generator)
        kept = nm_kept(values[:, candidate], n, m)
        if kept > best_kept + 1e-9:
            best, best_kept = candidate, kept
    return SearchResult(best, before, best_kept, bound)
