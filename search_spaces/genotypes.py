"""Genotypes: frozen, validated, with the benchmarks' string forms and JSON, derived from
architecture weights by pure functions.

* DARTS cells print as the DARTS code does:
  ``Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=[2, 3, 4, 5])``
* NAS-Bench-201 cells use the benchmark's arch string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``.
"""
from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence, Union

import numpy as np

from .ops import DARTS_OPS, NB201_OPS

Edge = tuple[str, int]


class GenotypeError(ValueError):
    """A genotype string, file or weight array that cannot be used; the message says why."""


def _check_ops(edges: Sequence[Edge], valid: Sequence[str], where: str) -> None:
    for op, _ in edges:
        if op not in valid:
            raise GenotypeError(f"unknown op {op!r} in {where}; valid ops: {', '.join(valid)}")


# ----------------------------------------------------------------------------- DARTS cells
@dataclass(frozen=True)
class DartsGenotype:
    """A DARTS cell pair: each intermediate node i (numbered from 2) takes two edges
    ``(op, input)`` with ``input < i``; the cell outputs the concatenation of ``*_concat``."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]
    space: ClassVar[str] = "darts"

    def __post_init__(self) -> None:
        for field in ("normal", "reduce"):
            edges = tuple((str(op), int(j)) for op, j in getattr(self, field))
            object.__setattr__(self, field, edges)
            if not edges or len(edges) % 2:
                raise GenotypeError(f"{field} must list two (op, input) edges per node, got {len(edges)} edges")
            _check_ops(edges, DARTS_OPS, field)
            for k, (op, j) in enumerate(edges):
                node = k // 2 + 2
                if not 0 <= j < node:
                    raise GenotypeError(
                        f"{field} edge {k} ({op!r}, {j}): node {node} can only take inputs 0..{node - 1}")
        for field in ("normal_concat", "reduce_concat"):
            concat = tuple(int(i) for i in getattr(self, field))
            object.__setattr__(self, field, concat)
            n_states = len(getattr(self, field.split("_")[0])) // 2 + 2
            if not concat or any(not 0 <= i < n_states for i in concat):
                raise GenotypeError(f"{field} {list(concat)} must name states in 0..{n_states - 1}")

    @property
    def nodes(self) -> int:
        return len(self.normal) // 2

    def to_str(self) -> str:
        def edges(es: Sequence[Edge]) -> str:
            return "[" + ", ".join(f"({op!r}, {j})" for op, j in es) + "]"

        return (f"Genotype(normal={edges(self.normal)}, normal_concat={list(self.normal_concat)}, "
                f"reduce={edges(self.reduce)}, reduce_concat={list(self.reduce_concat)})")

    __str__ = to_str

    def canonical(self) -> "DartsGenotype":
        """The same architecture with each node's two edges and the concat lists sorted, so that
        equal cells compare (and print) equal."""
        def nodes(es: Sequence[Edge]) -> tuple[Edge, ...]:
            return tuple(e for k in range(0, len(es), 2) for e in sorted(es[k:k + 2], key=lambda e: (e[1], e[0])))

        return DartsGenotype(nodes(self.normal), tuple(sorted(self.normal_concat)), nodes(self.reduce),
                             tuple(sorted(self.reduce_concat)))

    @classmethod
    def from_str(cls, text: str) -> "DartsGenotype":
        """Parse the DARTS form (``range(2, 6)`` and per-node nested lists are accepted too)."""
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as e:
            raise GenotypeError(f"malformed DARTS genotype string (syntax error at column {e.offset}): {text!r}") from None
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"
                and not tree.args):
            raise GenotypeError(
                "malformed DARTS genotype string: expected Genotype(normal=[...], normal_concat=[...], "
                f"reduce=[...], reduce_concat=[...]), got {text!r}")
        fields = {kw.arg: kw.value for kw in tree.keywords}
        expected = {"normal", "normal_concat", "reduce", "reduce_concat"}
        if set(fields) != expected:
            raise GenotypeError(
                f"malformed DARTS genotype string: fields {sorted(fields)} must be exactly {sorted(expected)}")
        return cls(normal=_edges_from_ast(fields["normal"], "normal"),
                   normal_concat=_ints_from_ast(fields["normal_concat"], "normal_concat"),
                   reduce=_edges_from_ast(fields["reduce"], "reduce"),
                   reduce_concat=_ints_from_ast(fields["reduce_concat"], "reduce_concat"))

    def to_json(self) -> dict[str, Any]:
        return {"space": self.space, "genotype": self.to_str(),
                "normal": [list(e) for e in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [list(e) for e in self.reduce], "reduce_concat": list(self.reduce_concat)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DartsGenotype":
        if data.get("space", cls.space) != cls.space:
            raise GenotypeError(f"genotype JSON is for space {data.get('space')!r}, not {cls.space!r}")
        if "normal" in data:
            try:
                return cls(normal=tuple(tuple(e) for e in data["normal"]), normal_concat=tuple(data["normal_concat"]),
                           reduce=tuple(tuple(e) for e in data["reduce"]), reduce_concat=tuple(data["reduce_concat"]))
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, GenotypeError):
                    raise
                raise GenotypeError(f"malformed DARTS genotype JSON: {e}") from None
        return cls.from_str(data["genotype"])


def _literal(node: ast.AST, field: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise GenotypeError(f"malformed DARTS genotype string: {field} is not a literal list") from None


def _edges_from_ast(node: ast.AST, field: str) -> tuple[Edge, ...]:
    value = _literal(node, field)
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(f"malformed DARTS genotype string: {field} must be a list of (op, input) pairs")
    if value and all(isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)) for v in value):
        value = [e for per_node in value for e in per_node]  # per-node nested form
    edges = []
    for e in value:
        if not (isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)):
            raise GenotypeError(f"malformed DARTS genotype string: {field} entry {e!r} is not an (op, input) pair")
        edges.append((e[0], e[1]))
    return tuple(edges)


def _ints_from_ast(node: ast.AST, field: str) -> tuple[int, ...]:
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords and 1 <= len(node.args) <= 2):
        bounds = [_literal(a, field) for a in node.args]
        if all(isinstance(b, int) for b in bounds):
            return tuple(range(*bounds))
    value = _literal(node, field)
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)):
        raise GenotypeError(f"malformed DARTS genotype string: {field} must be a list of ints or range(a, b)")
    return tuple(value)


# --------------------------------------------------------------------- NAS-Bench-201 cells
@dataclass(frozen=True)
class NB201Genotype:
    """A NAS-Bench-201 cell: ``nodes[i-1]`` lists the ``(op, input)`` edges into node i,
    one per earlier node 0..i-1."""

    nodes: tuple[tuple[Edge, ...], ...]
    space: ClassVar[str] = "nas-bench-201"

    def __post_init__(self) -> None:
        nodes = tuple(tuple((str(op), int(j)) for op, j in node) for node in self.nodes)
        object.__setattr__(self, "nodes", nodes)
        if len(nodes) != 3:
            raise GenotypeError(f"a NAS-Bench-201 cell has 3 nodes after the input, got {len(nodes)}")
        for i, node in enumerate(nodes, start=1):
            _check_ops(node, NB201_OPS, f"node {i}")
            if sorted(j for _, j in node) != list(range(i)):
                raise GenotypeError(f"node {i} must take exactly one edge from each of nodes 0..{i - 1}, "
                                    f"got inputs {[j for _, j in node]}")

    def to_str(self) -> str:
        return "|" + "|+|".join("|".join(f"{op}~{j}" for op, j in node) for node in self.nodes) + "|"

    __str__ = to_str

    def canonical(self) -> "NB201Genotype":
        """The same cell with each node's edges in input order (equal cells print equal)."""
        return NB201Genotype(tuple(tuple(sorted(node, key=lambda e: e[1])) for node in self.nodes))

    @property
    def edges(self) -> tuple[Edge, ...]:
        """Edges in the benchmark's order (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2)."""
        return tuple(e for node in self.nodes for e in sorted(node, key=lambda e: e[1]))

    @classmethod
    def from_str(cls, text: str) -> "NB201Genotype":
        text = text.strip()
        if not (text.startswith("|") and text.endswith("|")):
            raise GenotypeError(f"malformed NAS-Bench-201 arch string {text!r}: expected |op~0|+|op~0|op~1|+|...|")
        nodes = []
        for part in text.split("+"):
            if not (part.startswith("|") and part.endswith("|")) or len(part) < 3:
                raise GenotypeError(f"malformed NAS-Bench-201 arch string {text!r}: bad node {part!r}")
            edges = []
            for item in part[1:-1].split("|"):
                op, sep, j = item.partition("~")
                if not sep or not j.isdigit():
                    raise GenotypeError(f"malformed NAS-Bench-201 arch string {text!r}: edge {item!r} is not op~input")
                edges.append((op, int(j)))
            nodes.append(tuple(edges))
        return cls(tuple(nodes))

    def to_json(self) -> dict[str, Any]:
        return {"space": self.space, "genotype": self.to_str()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NB201Genotype":
        if data.get("space", cls.space) != cls.space:
            raise GenotypeError(f"genotype JSON is for space {data.get('space')!r}, not {cls.space!r}")
        return cls.from_str(data["genotype"])


Genotype = Union[DartsGenotype, NB201Genotype]
GENOTYPE_TYPES: dict[str, type] = {DartsGenotype.space: DartsGenotype, NB201Genotype.space: NB201Genotype}


# ------------------------------------------------------------------------------ derivation
def _as_rows(weights: Any, n_cols: int, what: str) -> np.ndarray:
    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    arr = np.asarray(weights, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n_cols:
        raise GenotypeError(f"{what} must have shape (edges, {n_cols}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise GenotypeError(f"{what} contains non-finite values")
    return arr


def derive_darts_cell(op_weights: Any, op_names: Sequence[str] = DARTS_OPS,
                      edge_weights: Sequence[Any] | None = None, nodes: int = 4) -> tuple[Edge, ...]:
    """Per node, keep the two incoming edges whose best non-``none`` op weight (times the edge
    weight, when given) is largest, and name the best non-``none`` op on each."""
    W = _as_rows(op_weights, len(op_names), "op_weights")
    if W.shape[0] != nodes * (nodes + 3) // 2:
        raise GenotypeError(f"{nodes} nodes need {nodes * (nodes + 3) // 2} edges, got {W.shape[0]}")
    usable = [k for k, name in enumerate(op_names) if name != "none"]
    if not usable:
        raise GenotypeError("no op other than 'none' to choose from")
    gene: list[Edge] = []
    start = 0
    for i in range(nodes):
        n_in = i + 2
        rows = W[start:start + n_in, usable]
        if edge_weights is not None:
            beta = np.asarray(edge_weights[i].detach().cpu() if hasattr(edge_weights[i], "detach")
                              else edge_weights[i], dtype=np.float64).reshape(-1)
            if beta.shape != (n_in,):
                raise GenotypeError(f"edge weights of node {i} must have {n_in} entries, got {beta.shape}")
            rows = rows * beta[:, None]
        strength = rows.max(axis=1)
        keep = sorted(range(n_in), key=lambda j: -strength[j])[:2]  # stable: lower input wins ties
        for j in keep:
            gene.append((op_names[usable[int(np.argmax(rows[j]))]], j))
        start += n_in
    return tuple(gene)


def derive_darts(normal: Any, reduce: Any, op_names: Sequence[str] = DARTS_OPS,
                 normal_edges: Sequence[Any] | None = None, reduce_edges: Sequence[Any] | None = None,
                 nodes: int = 4, multiplier: int = 4) -> DartsGenotype:
    concat = tuple(range(2 + nodes - multiplier, nodes + 2))
    return DartsGenotype(normal=derive_darts_cell(normal, op_names, normal_edges, nodes), normal_concat=concat,
                         reduce=derive_darts_cell(reduce, op_names, reduce_edges, nodes), reduce_concat=concat)


def derive_nb201(op_weights: Any, op_names: Sequence[str] = NB201_OPS) -> NB201Genotype:
    """The argmax op on each of the 6 edges (benchmark edge order)."""
    W = _as_rows(op_weights, len(op_names), "op_weights")
    if W.shape[0] != 6:
        raise GenotypeError(f"a NAS-Bench-201 cell has 6 edges, got {W.shape[0]} rows")
    return nb201_from_ops([op_names[int(k)] for k in W.argmax(axis=1)])


def nb201_from_ops(ops: Sequence[str]) -> NB201Genotype:
    """The NAS-Bench-201 cell with ``ops`` on its 6 edges, in benchmark edge order."""
    nodes, e = [], 0
    for i in range(1, 4):
        nodes.append(tuple((ops[e + j], j) for j in range(i)))
        e += i
    return NB201Genotype(tuple(nodes))


def edge_names(space: str, nodes: int = 4) -> tuple[str, ...]:
    """``"dst<-src"`` for each row of a cell's op weights, in the supernet's edge order. DARTS
    numbers the cell inputs 0, 1 and the intermediate nodes from 2 (as its genotypes do);
    NAS-Bench-201 numbers the input 0 and the nodes 1..3."""
    if space == "darts":
        return tuple(f"{i}<-{j}" for i in range(2, nodes + 2) for j in range(i))
    if space == "nas-bench-201":
        return tuple(f"{i}<-{j}" for i in range(1, 4) for j in range(i))
    raise GenotypeError(f"unknown search space {space!r}; valid: darts, nas-bench-201")


# ------------------------------------------------------------------- published genotypes
def _g(normal, reduce) -> DartsGenotype:
    return DartsGenotype(normal=tuple(normal), normal_concat=(2, 3, 4, 5), reduce=tuple(reduce),
                         reduce_concat=(2, 3, 4, 5))


# Cells as published by their authors' code (DARTS: quark0/darts genotypes.py; PC-DARTS:
# yuhuixu1993/PC-DARTS genotypes.py). GAEA_PC_DARTS is the CIFAR-10 cell of GAEA PC-DARTS
# (Li et al., ICLR 2021), which the paper gives only as a figure: of the two public
# transcriptions found, this is the one whose network (C=36, 20 cells) has the 3.7M
# parameters the paper reports (the other differs on two edges and has 3.3M).
# GAEA_PC_DARTS_IMAGENET is the cell Determined's GAEA ImageNet example trains.
_PUBLISHED: dict[str, Genotype] = {
    "DARTS_V1": _g(
        [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)]),
    "DARTS_V2": _g(
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)]),
    "PC_DARTS": _g(
        [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
         ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)]),
    "PC_DARTS_IMAGENET": _g(
        [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
         ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
        [("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
         ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)]),
    "GAEA_PC_DARTS": _g(
        [("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 2), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("dil_conv_3x3", 4), ("sep_conv_3x3", 0)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 2),
         ("sep_conv_5x5", 2), ("dil_conv_3x3", 3), ("sep_conv_5x5", 4), ("sep_conv_3x3", 1)]),
    "GAEA_PC_DARTS_IMAGENET": _g(
        [("skip_connect", 1), ("skip_connect", 0), ("sep_conv_3x3", 2), ("sep_conv_3x3", 1),
         ("sep_conv_5x5", 2), ("sep_conv_3x3", 0), ("sep_conv_5x5", 3), ("sep_conv_5x5", 2)],
        [("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_5x5", 2),
         ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_5x5", 1), ("max_pool_3x3", 2)]),
    # NAS-Bench-201's ResNet cell: two 3x3 convs with a skip around them.
    "NB201_RESNET": NB201Genotype.from_str(
        "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"),
}


def published_names() -> tuple[str, ...]:
    return tuple(_PUBLISHED)


def register_genotype(name: str, genotype: Genotype) -> None:
    if name in _PUBLISHED:
        raise ValueError(f"genotype {name!r} is already registered")
    _PUBLISHED[name] = genotype


def get_genotype(name: str) -> Genotype:
    try:
        return _PUBLISHED[name]
    except KeyError:
        raise GenotypeError(f"unknown genotype name {name!r}; published genotypes: {', '.join(_PUBLISHED)}") from None


def genotype_from_json(data: dict[str, Any]) -> Genotype:
    space = data.get("space")
    if space not in GENOTYPE_TYPES:
        raise GenotypeError(f"genotype JSON names space {space!r}; valid spaces: {', '.join(GENOTYPE_TYPES)}")
    return GENOTYPE_TYPES[space].from_json(data)


def load_genotype_file(path: str | os.PathLike) -> Genotype:
    """Read a genotype JSON file (as written by the search: ``genotype.json``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GenotypeError(f"genotype file {str(path)!r} does not exist; pass a published name "
                            f"({', '.join(_PUBLISHED)}), a genotype string, or the genotype.json a search wrote") from None
    except json.JSONDecodeError as e:
        raise GenotypeError(f"genotype file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "genotype" not in data:
        raise GenotypeError(f"genotype file {str(path)!r} has no 'genotype' entry")
    return genotype_from_json(data)


def parse_genotype(spec: str, space: str | None = None) -> Genotype:
    """Resolve a published name, a genotype string (DARTS form or NAS-Bench-201 arch string)
    or a path to a genotype JSON file. With ``space``, a genotype of another space is an error."""
    if not isinstance(spec, str) or not spec.strip():
        raise GenotypeError(f"genotype must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in _PUBLISHED:
        genotype = _PUBLISHED[spec]
    elif spec.startswith("Genotype"):
        genotype = DartsGenotype.from_str(spec)
    elif spec.startswith("|"):
        genotype = NB201Genotype.from_str(spec)
    elif spec.endswith(".json") or os.sep in spec or os.path.exists(spec):
        genotype = load_genotype_file(spec)
    else:
        raise GenotypeError(
            f"cannot read genotype {spec!r}: expected a published name ({', '.join(_PUBLISHED)}), "
            "a 'Genotype(normal=...)' string, a '|op~0|+|...|' arch string, or a genotype.json path")
    if space is not None and genotype.space != space:
        raise GenotypeError(f"genotype {spec!r} belongs to the {genotype.space} search space, "
                            f"but this run uses the {space} search space")
    return genotype
