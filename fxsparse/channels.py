"""The channel algebra every structural pass shares.

Each dimension of each tensor in the graph is either *opaque* (batch, spatial and sequence dims: nothing can be
removed there) or carries a **label** per index: an int naming the channel that index holds. Op rules (fxsparse.rules)
move labels from inputs to outputs and record facts about them:

- ``tie(a, b)``: index k of ``a`` and index k of ``b`` must be removed together (a residual add, the in-channels of
  a conv and the out-channels of the layer feeding it);
- ``fix(a, blocks)``: these channels cannot be re-indexed in the ways ``blocks`` names (see :data:`REMOVE`,
  :data:`REORDER`, :data:`REPEAT`): a model output or an op without a rule blocks everything; a normalisation over
  channels blocks removal, yet a reordering keeps its statistics;
- ``factor(base, outer, inner)``: ``base`` viewed as an ``(len(outer), len(inner))`` grid, as a view into heads
  does; a base channel survives iff its outer and its inner index survive, which keeps every reshape valid;
- parameter dimensions get one canonical label array each, so a weight used twice (tied embeddings) is tied for free.

After propagation, :meth:`ChannelGraph.analyse` joins tied labels into components (a vectorised union-find),
closes the factor constraints, and returns a :class:`ChannelAnalysis`: the **units** that can be removed (one
channel of a residual stream, one attention head, one head-dim index across heads...) and the **groups** they form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

Labels = Optional[torch.Tensor]  # int64, one label per index of a dimension; None = opaque

PRODUCE, CONSUME, FOLLOW = "produce", "consume", "follow"

# What a fix blocks: every structural pass re-indexes channels by one kind of index map (see fxsparse.index_map).
REMOVE, REORDER, REPEAT = 1, 2, 4  # keep a subset (shrink), permute (channel permutation), duplicate (width growth)
ALL = REMOVE | REORDER | REPEAT
OPERATIONS = {"remove": REMOVE, "reorder": REORDER, "repeat": REPEAT}
SCALE = "scale"  # a normalisation's per-channel scale (BatchNorm gamma): what BN-scale importance reads


@dataclass
class Space:
    """A block of labels allocated at once: one parameter dimension, the heads of a view, a merged axis..."""

    start: int
    size: int
    kind: str  # "param", "outer", "inner", "merge", "fixed"
    origin: str


@dataclass
class Member:
    """A parameter (or buffer) dimension whose indices carry ``labels``; shrink slices it by their survival."""

    target: str
    dim: int
    labels: torch.Tensor
    roles: set[str] = field(default_factory=set)


@dataclass
class Barrier:
    node: str
    op: str
    reason: str


class ChannelGraph:
    """The builder op rules write into while labels propagate through the graph."""

    def __init__(self) -> None:
        self.n_labels = 0
        self.spaces: list[Space] = []
        self.ties: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fixed: list[tuple[torch.Tensor, int]] = []  # (labels, the operations the fix blocks)
        self.factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.members: dict[tuple[str, int], Member] = {}
        self.member_shapes: dict[str, tuple[int, ...]] = {}
        self.barriers: list[Barrier] = []
        # Label arrays whose channels may only be repeated all alike (a LayerNorm's statistics run over them).
        self.uniform: list[torch.Tensor] = []
        # Labels produced by a weight that is not a plain parameter (computed in the graph): never provably zero.
        self.unverifiable_producers: list[torch.Tensor] = []
        # Nodes that contract a channel dim (fxsparse.rules.layers.Consumer): where removed channels' constants land.
        self.consumers: list = []
        # One tensor reachable under several names (tied weights): every name, by the canonical (first) one.
        self.aliases: dict[str, list[str]] = {}
        self._canonical: dict[int, str] = {}

    def canonical_target(self, target: str, tensor: torch.Tensor) -> str:
        """The first name under which ``tensor`` was seen, so that tied weights share their labels."""
        canonical = self._canonical.setdefault(id(tensor), target)
        names = self.aliases.setdefault(canonical, [canonical])
        if target not in names:
            names.append(target)
        return canonical

    # -- allocation -------------------------------------------------------------------------------------------
    def new_labels(self, size: int, kind: str, origin: str) -> torch.Tensor:
        start = self.n_labels
        self.n_labels += size
        self.spaces.append(Space(start, size, kind, origin))
        return torch.arange(start, start + size)

    def param_labels(self, target: str, dim: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The canonical labels of dimension ``dim`` of parameter/buffer ``target`` (allocated on first use)."""
        self.member_shapes[target] = tuple(shape)
        size = shape[dim]
        key = (target, dim)
        member = self.members.get(key)
        if member is None:
            member = Member(target, dim, self.new_labels(size, "param", f"{target}[{dim}]"))
            self.members[key] = member
        return member.labels

    def set_role(self, target: str, dim: int, role: str) -> None:
        self.members[(target, dim)].roles.add(role)

    # -- constraints ------------------------------------------------------------------------------------------
    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a is b:
            return
        if a.shape != b.shape:
            raise ValueError(f"cannot tie label arrays of lengths {len(a)} and {len(b)}")
        self.ties.append((a, b))

    def fix(self, labels: Labels, blocks: int = ALL) -> None:
        """``labels`` cannot take part in the re-indexings ``blocks`` names (a bit set of REMOVE, REORDER, REPEAT)."""
        if labels is not None:
            self.fixed.append((labels, blocks))

    def factor(self, base: torch.Tensor, outer: torch.Tensor, inner: torch.Tensor) -> None:
        if len(base) != len(outer) * len(inner):
            raise ValueError("factor sizes do not multiply to the base size")
        self.factors.append((base, outer, inner))

    def barrier(self, node: str, op: str, reason: str) -> None:
        self.barriers.append(Barrier(node, op, reason))

    def analyse(self) -> "ChannelAnalysis":
        return ChannelAnalysis(self)


def connected_components(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Component id (the smallest member label) of each of ``n`` labels joined by the pairs ``(a[i], b[i])``.

    Vectorised label propagation with pointer jumping: each round hooks every pair's larger root onto the smaller
    and flattens the forest, so it converges in a few rounds even for millions of labels.
    """
    parent = torch.arange(n)
    if len(a) == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        if torch.equal(pa, pb):
            return parent
        low, high = torch.minimum(pa, pb), torch.maximum(pa, pb)
        parent.scatter_reduce_(0, high, low, reduce="amin")
        while True:
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand


def _factor_table(n: int, factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each label's (outer, inner) factor pair (-1 where none), and the ties that make a label factored more than
    once agree: twice by two views, or twice within one (``cat([x, x])`` viewed as conv groups puts channel k
    in two groups at once, and those groups can then only go together)."""
    empty = torch.empty(0, dtype=torch.long)
    base = torch.cat([b for b, _, _ in factors]) if factors else empty
    outer = torch.cat([o.repeat_interleave(len(i)) for _, o, i in factors]) if factors else empty
    inner = torch.cat([i.repeat(len(o)) for _, o, i in factors]) if factors else empty
    rows = torch.arange(len(base))
    first = torch.full((n,), len(base), dtype=torch.long).scatter_reduce_(0, base, rows, reduce="amin")[base]
    factor_of = torch.full((n, 2), -1, dtype=torch.long)
    factor_of[base[first == rows]] = torch.stack([outer, inner], dim=1)[first == rows]
    again = first != rows
    return factor_of, torch.cat([outer[again], inner[again]]), torch.cat([outer[first[again]], inner[first[again]]])


class ChannelAnalysis:
    """Components, units and groups of a finished :class:`ChannelGraph`.

    A *unit* is a component of labels that can be removed on its own; a *derived* component (a base channel of a
    factored axis) is removed exactly when one of its factors' units is. ``keep_labels(removed_units)`` turns a
    decision into a keep flag per label, which is all a rewrite needs.
    """

    def __init__(self, graph: ChannelGraph) -> None:
        self.graph = graph
        n = graph.n_labels
        self.n_labels = n
        pairs_a = [a for a, _ in graph.ties]
        pairs_b = [b for _, b in graph.ties]
        factor_of, extra_a, extra_b = _factor_table(n, graph.factors)
        # Close: members of one component with different factor pairs force those factors together.
        has_factor = factor_of[:, 0] >= 0
        cat = lambda xs: torch.cat(xs) if xs else torch.empty(0, dtype=torch.long)  # noqa: E731
        a_all, b_all = cat(pairs_a + [extra_a]), cat(pairs_b + [extra_b])
        for _ in range(32):
            comp = connected_components(n, a_all, b_all)
            labels = torch.nonzero(has_factor).flatten()
            roots = comp[labels]
            # first factored label of each component, as the representative the others must agree with
            first = torch.full((n,), n, dtype=torch.long).scatter_reduce_(0, roots, labels, reduce="amin")
            rep = first[roots]
            new_a = torch.cat([factor_of[labels, 0], factor_of[labels, 1]])
            new_b = torch.cat([factor_of[rep, 0], factor_of[rep, 1]])
            pending = comp[new_a] != comp[new_b]
            if not pending.any():
                break
            a_all = torch.cat([a_all, new_a[pending]])
            b_all = torch.cat([b_all, new_b[pending]])
        self.component = comp
        derived = torch.zeros(n, dtype=torch.bool)
        derived[comp[labels]] = True
        self.derived_component = derived  # indexed by component root
        self.factor_of = factor_of
        self._fix(graph)
        self._build_units()

    # -- fixed channels ---------------------------------------------------------------------------------------
    def _fix(self, graph: ChannelGraph) -> None:
        """``blocked``: per component root, the operations some fix forbids. A blocked derived component blocks the
        same operations on all of its factors (a fixed head-dim fixes its head); iterate, factors may be factored."""
        comp = self.component
        blocked = torch.zeros(self.n_labels, dtype=torch.long)
        by_blocks: dict[int, list[torch.Tensor]] = {}  # a few distinct bit sets: one scatter each
        for labels, blocks in graph.fixed:
            by_blocks.setdefault(blocks, []).append(labels)
        for blocks, arrays in by_blocks.items():
            roots = comp[torch.cat(arrays)]
            blocked[roots] = blocked[roots] | blocks
        for member in graph.members.values():
            if PRODUCE in member.roles and CONSUME in member.roles:
                # one tensor both makes and reads these channels (an embedding tied to an LM head): a copy would
                # need its rows duplicated and split at once
                roots = comp[member.labels]
                blocked[roots] = blocked[roots] | REPEAT
        factored = torch.nonzero(self.factor_of[:, 0] >= 0).flatten()
        for _ in range(32):
            hit = factored[blocked[comp[factored]] != 0]
            factor_roots = comp[torch.cat([self.factor_of[hit, 0], self.factor_of[hit, 1]])]
            bits = blocked[comp[hit]].repeat(2)
            before = blocked.clone()
            for bit in (REMOVE, REORDER, REPEAT):
                blocked[factor_roots[(bits & bit) != 0]] |= bit
            if torch.equal(before, blocked):
                break
        self.blocked_component = blocked
        self.fixed_component = (blocked & REMOVE) != 0

    # -- units and groups -------------------------------------------------------------------------------------
    def channel_units(self, include_fixed: bool = False, operation: int = REMOVE) -> torch.Tensor:
        """Component roots that are channels: produced by some weight, or a factor (a head, a group) of such
        channels. A parameter dim nobody produces (an embedding table's rows, a kernel's taps) is no channel.
        Channels a fix blocks for ``operation`` (REMOVE, REORDER or REPEAT) are left out unless ``include_fixed``
        (a new, smaller model may drop them)."""
        comp = self.component
        roots = torch.unique(comp)
        roots = roots[~self.derived_component[roots]]
        if not include_fixed:
            roots = roots[(self.blocked_component[roots] & operation) == 0]
        produced = torch.zeros(self.n_labels, dtype=torch.bool)
        for member in self.graph.members.values():
            if PRODUCE in member.roles:
                produced[comp[member.labels]] = True
        for space in self.graph.spaces:
            if space.kind in ("outer", "inner"):
                produced[comp[space.start: space.start + space.size]] = True
        return roots[produced[roots]]

    def group_kinds(self) -> dict[int, str]:
        """Each space group's kind: "heads/groups" (outer factors: attention heads, conv groups), "per-head dims"
        (inner factors), or "channels"."""
        kinds: dict[int, set[str]] = {}
        for index, space in enumerate(self.graph.spaces):
            kinds.setdefault(int(self.space_group[index]), set()).add(space.kind)
        return {group: "heads/groups" if "outer" in k else "per-head dims" if "inner" in k else "channels"
                for group, k in kinds.items()}

    def _build_units(self) -> None:
        comp = self.component
        self.units = self.channel_units()  # component roots that a decision may remove
        space_of = torch.empty(self.n_labels, dtype=torch.long)
        for index, space in enumerate(self.graph.spaces):
            space_of[space.start: space.start + space.size] = index
        # Groups: spaces joined by components (a residual stream's producers, the heads of q, k and v).
        space_comp = connected_components(len(self.graph.spaces), space_of, space_of[comp])
        self.space_of = space_of
        self.space_group = space_comp
        self.unit_group = space_comp[space_of[self.units]]

    def dependents(self, per_component: torch.Tensor) -> torch.Tensor:
        """For a per-component flag, each unit's OR over its own component and the derived components it decides."""
        flag = per_component.clone()
        factored = torch.nonzero(self.factor_of[:, 0] >= 0).flatten()
        if len(factored):
            derived_flag = per_component[self.component[factored]]
            for column in (0, 1):
                roots = self.component[self.factor_of[factored, column]]
                flag.scatter_reduce_(0, roots, derived_flag, reduce="amax")
        return flag[self.units]

    def flag(self, labels) -> torch.Tensor:
        """A bool per label, True at ``labels`` (label or unit ids): for counting a set's members by index."""
        flags = torch.zeros(self.n_labels, dtype=torch.bool)
        flags[labels] = True
        return flags

    def keep_labels(self, removed_units: torch.Tensor) -> torch.Tensor:
        """A bool per label: does it survive when the units (component roots) in ``removed_units`` are removed?"""
        comp = self.component
        keep_comp = torch.ones(self.n_labels, dtype=torch.bool)
        keep_comp[removed_units] = False
        keep = keep_comp[comp]
        factored = torch.nonzero(self.factor_of[:, 0] >= 0).flatten()
        if len(factored):
            # A factored label lives iff both factors live; factors may themselves be factored: iterate to a fixpoint.
            for _ in range(32):
                outer, inner = self.factor_of[factored, 0], self.factor_of[factored, 1]
                alive = keep[outer] & keep[inner]
                # every member of a derived component shares the component's fate
                comp_alive = torch.ones(self.n_labels, dtype=torch.bool)
                comp_alive.scatter_reduce_(0, comp[factored], alive, reduce="amin")
                new_keep = keep & comp_alive[comp]
                if torch.equal(new_keep, keep):
                    break
                keep = new_keep
        return keep

    def restore(self, removed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``removed`` without the units that decide the fate of ``labels``: their own, their factors', and the
        factors' factors (a channel shuffled twice)."""
        deciding = [self.component[labels]]
        frontier = labels
        for _ in range(64):
            # factors of any member of the frontier's components
            members = torch.nonzero(torch.isin(self.component, self.component[frontier])).flatten()
            factors = self.factor_of[members]
            factors = factors[factors[:, 0] >= 0].flatten()
            factors = factors[~torch.isin(self.component[factors], torch.cat(deciding))]
            if not len(factors):
                break
            deciding.append(self.component[factors])
            frontier = factors
        return removed[~torch.isin(removed, torch.cat(deciding))]

    def keep_nonempty(self, removed: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """``removed`` with units restored wherever a parameter dimension would lose every index."""
        notes = []
        for _ in range(len(self.graph.members) + 1):
            keep = self.keep_labels(removed)
            empty = [m for m in self.graph.members.values() if not bool(keep[m.labels].any())]
            if not empty:
                return removed, notes
            member = empty[0]
            notes.append(f"{member.target}[{member.dim}] would lose every channel: one is kept")
            removed = self.restore(removed, member.labels[:1])
        raise RuntimeError("could not keep every parameter dimension non-empty")

    def unit_labels(self) -> dict[int, torch.Tensor]:
        """The labels of each unit's own component (derived labels not included)."""
        comp = self.component
        order = torch.argsort(comp)
        sorted_comp = comp[order]
        units = self.units
        starts = torch.searchsorted(sorted_comp, units)
        ends = torch.searchsorted(sorted_comp, units, right=True)
        return {int(u): order[s:e] for u, s, e in zip(units.tolist(), starts.tolist(), ends.tolist())}
