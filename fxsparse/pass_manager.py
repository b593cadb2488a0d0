"""Passes and the manager that orders, runs, times and verifies them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .context import CompileContext
from .errors import BadArgumentError, PassOrderError

class Pass:
    """One step of the compiler.

    ``requires`` and ``provides`` name facts (see :class:`CompileContext`). ``rewrites`` passes change the module;
    they invalidate every fact not listed in ``preserves`` and may be followed by verification.
    ``run`` returns report rows: a list of dicts, one table row each. ``needs_values`` passes read the weights'
    values (not only their shapes), as every rewriting pass does: they cannot run on the meta device.
    """

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    rewrites: ClassVar[bool] = False
    preserves: ClassVar[tuple[str, ...]] = ()
    needs_values: ClassVar[bool] = False

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The pass's options, as recorded in the plan."""
        return {}

    def summary(self, rows: list[dict[str, Any]]) -> str:
        """One line for the report's summary table."""
        return f"{len(rows)} rows"

    def expand(self) -> list["Pass"]:
        """The passes this one stands for (an iterative pass unrolls into its steps); itself by default."""
        return [self]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"


@dataclass
class PassRecord:
    name: str
    seconds: float
    rows: list[dict[str, Any]]
    summary: str
    inserted: bool = False
    verification: dict[str, Any] | None = None


@dataclass
class PassManager:
    """Runs passes in order, inserting the analyses a pass requires and nobody provided.

    ``providers`` maps a fact to a factory of the default pass that computes it (e.g. "shapes" -> ShapeInference).
    ``verifier`` is called after each rewriting pass when the context asks for verification.
    """

    passes: list[Any]
    providers: dict[str, Callable[[], Pass]] = field(default_factory=dict)
    verifier: Callable[[CompileContext, Pass], dict[str, Any]] | None = None

    def schedule(self, available: set[str] = frozenset()) -> list[tuple[Pass, bool]]:
        """The passes to run, each with whether the manager inserted it; raises PassOrderError when impossible."""
        known = set(available)
        order: list[tuple[Pass, bool]] = []
        for index, p in enumerate(self.passes):
            if not isinstance(p, Pass):
                raise BadArgumentError(f"passes[{index}] is {p!r}, not a fxsparse pass")
        for p in [step for p in self.passes for step in p.expand()]:
            for fact in p.requires:
                if fact in known:
                    continue
                order.extend(self._insert_provider(fact, p, known, depth=0))
            order.append((p, False))
            if p.rewrites:
                known &= set(p.preserves)
            known |= set(p.provides)
        return order

    def _insert_provider(self, fact: str, wanted_by: Pass, known: set[str], depth: int) -> list[tuple[Pass, bool]]:
        if depth > 8:
            raise PassOrderError(f"analyses required by {wanted_by.name} depend on each other in a cycle")
        if fact not in self.providers:
            raise PassOrderError(
                f"pass {wanted_by.name!r} requires {fact!r}, which no earlier pass provides and no analysis can "
                f"compute on its own; add a pass that provides it (e.g. MaskPropagation or Prune) before {wanted_by.name!r}"
            )
        provider = self.providers[fact]()
        inserted: list[tuple[Pass, bool]] = []
        for sub in provider.requires:
            if sub not in known:
                inserted.extend(self._insert_provider(sub, provider, known, depth + 1))
        inserted.append((provider, True))
        known |= set(provider.provides)
        return inserted

    def run(self, ctx: CompileContext, progress: Callable[[str], None] | None = None) -> list[PassRecord]:
        records: list[PassRecord] = []
        for p, inserted in self.schedule(set(ctx.facts)):
            if progress:
                progress(p.name)
            before = ctx.module
            if p.rewrites and ctx.verify and self.verifier is not None:
                ctx.reference = before
            start = time.perf_counter()
            rows = p.run(ctx)
            seconds = time.perf_counter() - start
            if p.rewrites and ctx.module is before:
                raise PassOrderError(
                    f"pass {p.name!r} rewrote the module in place; a rewriting pass must put a new module in "
                    f"ctx.module, so that the one before it stays the reference it is verified against")
            if p.rewrites:
                for fact in list(ctx.facts):
                    if fact not in p.preserves and fact not in p.provides:
                        del ctx.facts[fact]
            verification = None
            if p.rewrites and ctx.verify and self.verifier is not None:
                verification = self.verifier(ctx, p)
                ctx.reference = None
            ctx.reference_outputs = {}  # what a pass handed its verification: used, or not needed, either way done
            records.append(PassRecord(p.name, seconds, rows, p.summary(rows), inserted, verification))
        return records
