"""Index maps: the one decision every structural rewrite applies.

A structural pass decides, per unit of channels (see fxsparse.channels), what takes its place in the new model:

- nothing (the unit is removed: Shrink),
- another unit of the same group (a permutation: ChannelPermutation),
- itself several times, each copy with a fraction of what it contributes downstream (width growth: ExpandWidth).

That is a *substitution* of units. :class:`IndexMap` turns it into what a rewrite needs for any label array (a
parameter dimension, or a dimension of a tensor in the graph):

- ``counts(labels)``: how many new indices each old index becomes (0, 1 or k). View sizes, split sizes, slice offsets
  and conv group counts follow from these alone, so every rule's ``rewrite`` handles every kind of map.
- ``gather(labels)``: for a parameter dimension, which old index each new index reads, and the fraction it is scaled
  by where it *consumes* the channel (a copy of a channel adds only its share to a sum, which keeps the function).

A derived channel (a head-dim of a head: q's row ``h*D + d``) takes the fate of its factors: it goes when either
goes, moves where both move, and is copied once per pair of copies, outer-major, as a view into heads requires.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .channels import ChannelAnalysis
from .errors import FxsparseError


class UnsupportedIndexMap(FxsparseError):
    """A label array is laid out in a way this index map cannot re-index (e.g. copies inside a mixed layout)."""


@dataclass
class IndexMap:
    """A substitution of units. ``count[c]`` and ``source[c]`` are per component root (see ChannelAnalysis):
    the slot of component ``c`` becomes ``count[c]`` copies of component ``source[c]``; ``fractions[c]`` gives the
    share of each copy (summing to 1) where ``count[c] > 1``."""

    analysis: ChannelAnalysis
    count: torch.Tensor
    source: torch.Tensor
    fractions: dict[int, torch.Tensor] = field(default_factory=dict)
    # per factored label: its component and its factors' components (set by _derive; read to rebuild grids)
    _derived_factors: tuple[torch.Tensor, ...] = field(default=(), init=False, repr=False)

    # -- making one ----------------------------------------------------------------------------------------------
    @classmethod
    def identity(cls, analysis: ChannelAnalysis) -> "IndexMap":
        n = analysis.n_labels
        return cls(analysis, torch.ones(n, dtype=torch.long), torch.arange(n))

    @classmethod
    def removal(cls, analysis: ChannelAnalysis, removed_units: torch.Tensor) -> "IndexMap":
        """Remove ``removed_units`` (component roots): Shrink's map."""
        index_map = cls.identity(analysis)
        index_map.count[removed_units] = 0
        return index_map._derive()

    @classmethod
    def permutation(cls, analysis: ChannelAnalysis, slots: torch.Tensor, sources: torch.Tensor) -> "IndexMap":
        """The slot of unit ``slots[k]`` takes unit ``sources[k]`` (a permutation of ``slots``)."""
        if sorted(slots.tolist()) != sorted(sources.tolist()):
            raise FxsparseError("a channel permutation must map a set of units onto itself")
        index_map = cls.identity(analysis)
        index_map.source[slots] = sources
        return index_map._derive()

    @classmethod
    def repeat(cls, analysis: ChannelAnalysis, units: torch.Tensor, copies: torch.Tensor,
               fractions: list[torch.Tensor]) -> "IndexMap":
        """Unit ``units[k]`` becomes ``copies[k]`` copies, the j-th contributing ``fractions[k][j]`` downstream."""
        index_map = cls.identity(analysis)
        index_map.count[units] = copies
        for unit, share in zip(units.tolist(), fractions):
            index_map.fractions[unit] = share
        return index_map._derive()

    # -- derived components ------------------------------------------------------------------------------------
    def _derive(self) -> "IndexMap":
        """Counts and sources of derived components, from their factors' (factors may be factored).

        A derived component moves to the one made by the same view of its factors' sources: q's row (head 0, dim 1)
        takes q's row (head 2, dim 1) when head 2 moves into head 0's slot, not k's row of the same pair. So sources
        are found label by label, within the outer and inner label spaces of the view that made them.
        """
        analysis = self.analysis
        comp = analysis.component
        factored = torch.nonzero(analysis.factor_of[:, 0] >= 0).flatten()
        if not len(factored):
            return self
        outer_labels, inner_labels = analysis.factor_of[factored, 0], analysis.factor_of[factored, 1]
        derived, outer, inner = comp[factored], comp[outer_labels], comp[inner_labels]
        self._derived_factors = (derived, outer, inner)
        for _ in range(32):
            before = (self.count.clone(), self.source.clone())
            self.count[derived] = self.count[outer] * self.count[inner]
            moved = (self.source[outer] != outer) | (self.source[inner] != inner)
            if bool(moved.any()):
                self._move_derived(factored[moved], outer_labels[moved], inner_labels[moved])
            if torch.equal(before[0], self.count) and torch.equal(before[1], self.source):
                break
        return self

    def _move_derived(self, bases: torch.Tensor, outer_labels: torch.Tensor, inner_labels: torch.Tensor) -> None:
        analysis = self.analysis
        comp = analysis.component
        factored = torch.nonzero(analysis.factor_of[:, 0] >= 0).flatten()
        base_of_pair = {(o, i): b for b, (o, i) in zip(factored.tolist(), analysis.factor_of[factored].tolist())}
        moved_label = self._moved_labels(torch.cat([outer_labels, inner_labels]))
        for base, o, i in zip(bases.tolist(), outer_labels.tolist(), inner_labels.tolist()):
            target = base_of_pair.get((moved_label[o], moved_label[i]))
            if target is None:
                raise FxsparseError("a permutation moves a factor to a place its pair does not exist "
                                    f"(label {base}); permute whole heads or dims of every head")
            self.source[comp[base]] = comp[target]

    def _moved_labels(self, labels: torch.Tensor) -> dict[int, int]:
        """For factor labels: the label of the same view space that holds their component's source."""
        analysis = self.analysis
        moved = {}
        for space_index in torch.unique(analysis.space_of[labels]).tolist():
            space = analysis.graph.spaces[space_index]
            space_labels = torch.arange(space.start, space.start + space.size)
            comps = analysis.component[space_labels]
            read = _find_same_occurrence(comps, self.source[comps])
            moved.update(zip(space_labels.tolist(), space_labels[read].tolist()))
        return moved

    # -- what rewrites ask ---------------------------------------------------------------------------------------
    def counts(self, labels: torch.Tensor) -> torch.Tensor:
        """New indices per old index of a label array: offsets and sizes follow from their sums."""
        return self.count[self.analysis.component[labels]]

    def is_identity(self, labels: torch.Tensor) -> bool:
        comps = self.analysis.component[labels]
        return bool((self.count[comps] == 1).all() and (self.source[comps] == comps).all())

    def only_removes(self) -> bool:
        """Whether every unit stays where it is or goes (no copies, no moves): Shrink's maps."""
        return bool((self.count <= 1).all()) and torch.equal(self.source, torch.arange(len(self.source)))

    def kept_positions(self, label_arrays: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """For a map that only removes: per label array, the positions it keeps (None where it keeps all), found for
        all arrays at once; ``gather`` one array at a time costs a dozen small tensor ops each."""
        if not label_arrays:
            return []
        keep = self.count[self.analysis.component[torch.cat(label_arrays)]] == 1
        kept = []
        for part in keep.split([len(labels) for labels in label_arrays]):
            kept.append(None if bool(part.all()) else torch.nonzero(part).flatten())
        return kept

    def gather(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(old index read by each new index, its fraction) along a parameter dimension with these labels."""
        comps = self.analysis.component[labels]
        if bool((self.count[comps] <= 1).all()):
            read = _find_same_occurrence(comps, self.source[comps])
            keep = self.count[comps] == 1
            return read[keep], torch.ones(int(keep.sum()))
        return self._expand(comps)

    def _expand(self, comps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies in place: a plain channel's copies sit next to it; a block of derived channels (heads x dims) is
        rebuilt as the outer-major product of its outer and inner units' copies."""
        derived_flag = self.analysis.derived_component[comps]
        reads, shares, start = [], [], 0
        for is_derived, length in _runs(derived_flag):
            block = comps[start: start + length]
            read, share = self._expand_grid(block) if is_derived else self._expand_list(block)
            reads.append(read + start)
            shares.append(share)
            start += length
        return torch.cat(reads), torch.cat(shares)

    def _expand_list(self, comps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain channels: each distinct, or a run-length repeat (``repeat_interleave``: a channel flattened with the
        spatial dims), or a tiling (``repeat``) of distinct channels."""
        n = len(comps)
        if len(torch.unique(comps)) == n:
            counts = self.count[comps]
            if bool((self.source[comps] != comps).any()):
                raise UnsupportedIndexMap("an index map that both copies and moves channels")
            read = torch.repeat_interleave(torch.arange(n), counts)
            shares = [self.fractions.get(int(c), torch.ones(1)) if int(k) else torch.ones(0)
                      for c, k in zip(comps.tolist(), counts.tolist())]
            return read, torch.cat(shares) if shares else torch.ones(0)
        values, run_lengths = torch.unique_consecutive(comps, return_counts=True)
        run = int(run_lengths[0])
        if bool((run_lengths == run).all()) and len(torch.unique(values)) == len(values):
            read, share = self._expand_list(values)
            offsets = torch.arange(run)
            return (read[:, None] * run + offsets).flatten(), share.repeat_interleave(run)
        period = int(torch.nonzero(comps == comps[0]).flatten()[1]) if int((comps == comps[0]).sum()) > 1 else n
        if n % period == 0 and torch.equal(comps.reshape(-1, period), comps[:period].expand(n // period, period)):
            read, share = self._expand_list(comps[:period])
            tiles = torch.arange(n // period)
            return (tiles[:, None] * period + read).flatten(), share.repeat(n // period)
        raise UnsupportedIndexMap("channels laid out in a mixed order (neither distinct, repeated nor tiled)")

    def _expand_grid(self, comps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Derived channels laid out as outer-major grids of (outer, inner) factor components."""
        derived, outer, inner = self._derived_factors
        factor = torch.full((self.analysis.n_labels, 2), -1, dtype=torch.long)
        factor[derived, 0], factor[derived, 1] = outer, inner
        pairs = factor[comps]
        reads, shares, start = [], [], 0
        while start < len(comps):
            first_inner = pairs[start, 1]
            again = torch.nonzero(pairs[start + 1:, 1] == first_inner).flatten()
            width = int(again[0]) + 1 if len(again) else len(comps) - start
            rows = 1
            while start + (rows + 1) * width <= len(comps) and torch.equal(
                    pairs[start + rows * width: start + (rows + 1) * width, 1], pairs[start: start + width, 1]):
                rows += 1
            grid = pairs[start: start + rows * width]
            outer_read, outer_share = self._expand_list(grid[::width, 0])
            inner_read, inner_share = self._expand_list(grid[:width, 1])
            reads.append(start + (outer_read[:, None] * width + inner_read[None, :]).flatten())
            shares.append((outer_share[:, None] * inner_share[None, :]).flatten())
            start += rows * width
        return torch.cat(reads), torch.cat(shares)


def _runs(flags: torch.Tensor):
    """(value, length) of each run of equal values in a bool tensor."""
    values, lengths = torch.unique_consecutive(flags, return_counts=True)
    return zip(values.tolist(), lengths.tolist())


def _find_same_occurrence(comps: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """For each position i, the position holding component ``wanted[i]`` at the same occurrence (the k-th time it
    appears) as position i's own component: where a permuted channel is read from, also in tiled layouts."""
    if torch.equal(comps, wanted):
        return torch.arange(len(comps))
    n = len(comps)
    occurrence = _occurrence(comps)
    key = comps * (n + 1) + occurrence
    order = torch.argsort(key)
    wanted_key = wanted * (n + 1) + occurrence
    found = torch.searchsorted(key[order], wanted_key)
    found = found.clamp(max=n - 1)
    if not bool(torch.equal(key[order][found], wanted_key)):
        raise FxsparseError("a permutation moves a channel to a tensor that does not hold its source")
    return order[found]


def _occurrence(comps: torch.Tensor) -> torch.Tensor:
    """How many earlier positions hold the same component."""
    order = torch.argsort(comps, stable=True)
    sorted_comps = comps[order]
    first = torch.searchsorted(sorted_comps, sorted_comps)
    occurrence = torch.empty_like(comps)
    occurrence[order] = torch.arange(len(comps)) - first
    return occurrence
