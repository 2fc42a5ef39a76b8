"""The domain taxonomy: a tree of domain ids used by manifests and by the router.

Edges point from parent to child. The ten top-level *verticals* match ``../shared/data``; each
has a few sub-domains. A query routed to a sub-domain with no expert falls back along
:meth:`Taxonomy.chain` (``cardiology -> medicine``). The registry adds the domains teams
register (``Registry.add_domain``) on top of :data:`DEFAULT_TAXONOMY`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from registry.errors import ManifestError
from registry.manifest import DOMAIN_PATTERN

if TYPE_CHECKING:
    import networkx as nx

DEFAULT_TAXONOMY: Mapping[str, tuple[str, ...]] = {
    "medicine": ("cardiology", "oncology", "pharmacology", "nutrition", "virology", "anatomy"),
    "law": ("contract_law", "criminal_law", "international_law", "jurisprudence"),
    "finance": ("accounting", "economics", "banking", "marketing", "management"),
    "math": ("arithmetic", "algebra", "calculus", "statistics", "geometry"),
    "code": ("python", "machine_learning", "computer_security", "algorithms"),
    "science": ("physics", "chemistry", "biology", "astronomy", "electrical_engineering"),
    "humanities": ("history", "philosophy", "religion", "logic"),
    "social_science": ("psychology", "sociology", "politics", "geography"),
    "everyday": ("cooking", "travel", "home", "small_talk"),
    "general_knowledge": ("trivia", "misconceptions", "fiction"),
}
"""Vertical -> its default sub-domains."""


class Taxonomy:
    """A tree of domain ids (a :class:`networkx.DiGraph`, parent -> child)."""

    def __init__(self, graph: nx.DiGraph | None = None) -> None:
        import networkx  # here, not at import time: `mose expert list` never needs it

        self.graph: networkx.DiGraph = graph if graph is not None else networkx.DiGraph()

    @classmethod
    def default(cls, extra: Iterable[tuple[str, str | None]] = ()) -> Taxonomy:
        """The default verticals and sub-domains, plus ``extra`` ``(domain, parent)`` pairs in order."""
        taxonomy = cls()
        for vertical, subs in DEFAULT_TAXONOMY.items():
            taxonomy.add(vertical)
            for sub in subs:
                taxonomy.add(sub, parent=vertical)
        for name, parent in extra:
            taxonomy.add(name, parent=parent)
        return taxonomy

    def add(self, name: str, parent: str | None = None) -> None:
        """Add a domain (a new vertical when ``parent`` is None). Re-adding with the same parent is a no-op."""
        if not re.match(DOMAIN_PATTERN, name):
            raise ManifestError(f"{name!r} is not a domain id: use lowercase letters, digits and _ (e.g. tax_law)")
        if parent is not None and parent not in self:
            raise ManifestError(f"parent domain {parent!r} is unknown. {self._known_hint()}")
        if name in self:
            if self.parent(name) != parent:
                raise ManifestError(
                    f"domain {name!r} already exists under {self.parent(name) or 'the root'}; a domain has one parent"
                )
            return
        self.graph.add_node(name)
        if parent is not None:
            self.graph.add_edge(parent, name)

    def __contains__(self, name: object) -> bool:
        return name in self.graph

    def known(self) -> list[str]:
        """Every domain id, sorted."""
        return sorted(self.graph.nodes)

    def verticals(self) -> list[str]:
        """Top-level domains (no parent), sorted."""
        return sorted(node for node in self.graph.nodes if self.graph.in_degree(node) == 0)

    def parent(self, name: str) -> str | None:
        """The parent domain, or None for a vertical. Unknown domain: :class:`ManifestError`."""
        self._require(name)
        parents = list(self.graph.predecessors(name))
        return parents[0] if parents else None

    def children(self, name: str) -> list[str]:
        """Direct sub-domains, sorted."""
        self._require(name)
        return sorted(self.graph.successors(name))

    def chain(self, name: str) -> list[str]:
        """``[name, parent, ..., vertical]``: the fallback order for a query in ``name``."""
        chain = [name]
        while (parent := self.parent(chain[-1])) is not None:
            chain.append(parent)
        return chain

    def vertical(self, name: str) -> str:
        """The top-level domain ``name`` belongs to."""
        return self.chain(name)[-1]

    def require_known(self, domains: Iterable[str], source: str = "manifest") -> None:
        """Raise :class:`ManifestError` naming the first unknown domain and listing the known ones."""
        for domain in domains:
            if domain not in self:
                raise ManifestError(f"{source}: domains: unknown domain {domain!r}. {self._known_hint()}")

    def _require(self, name: str) -> None:
        if name not in self:
            raise ManifestError(f"unknown domain {name!r}. {self._known_hint()}")

    def _known_hint(self) -> str:
        return (
            f"Known domains: {', '.join(self.known())}. "
            "A new domain can be added with `mose expert domains --add NAME [--parent PARENT]`."
        )

    def __repr__(self) -> str:
        return f"Taxonomy({self.graph.number_of_nodes()} domains, verticals={self.verticals()})"
