"""Search spaces for weight-sharing NAS: the DARTS CNN cell space (with PC-DARTS partial
channels) and NAS-Bench-201, as supernets, genotypes and retrainable networks.

    import search_spaces
    net = search_spaces.create("darts", C=16, layers=8, partial_channels=4, edge_normalization=True)
    genotype = search_spaces.parse_genotype("DARTS_V2")
    model = search_spaces.create_network(genotype, C=36, layers=20)

No Determined import here: the package runs under plain PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .arch import CellWeights
from .darts import DartsNetwork, DartsSupernet
from .genotypes import (DartsGenotype, Genotype, GenotypeError, NB201Genotype, derive_darts, derive_nb201,
                        edge_names, get_genotype, load_genotype_file, parse_genotype, published_names, register_genotype)
from .nb201 import NB201Network, NB201Supernet
from .ops import DARTS_OPS, NB201_OPS, create_op, op_names, register_op
from .profile import count_macs, count_parameters


@dataclass(frozen=True)
class SearchSpace:
    name: str
    ops: tuple[str, ...]
    supernet: Callable[..., nn.Module]
    network: Callable[..., nn.Module]
    genotype_type: type


_SPACES: dict[str, SearchSpace] = {}


def register_space(space: SearchSpace) -> SearchSpace:
    if space.name in _SPACES:
        raise ValueError(f"search space {space.name!r} is already registered")
    _SPACES[space.name] = space
    return space


def space_names() -> tuple[str, ...]:
    return tuple(_SPACES)


def get_space(name: str) -> SearchSpace:
    try:
        return _SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; valid search spaces: {', '.join(_SPACES)}") from None


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the supernet of search space ``name``."""
    return get_space(name).supernet(**kwargs)


def create_network(genotype: Genotype, **kwargs: Any) -> nn.Module:
    """Build the discrete (retrainable) network of a genotype, in its own search space."""
    return get_space(genotype.space).network(genotype, **kwargs)


register_space(SearchSpace("darts", DARTS_OPS, DartsSupernet, DartsNetwork, DartsGenotype))
register_space(SearchSpace("nas-bench-201", NB201_OPS, NB201Supernet, NB201Network, NB201Genotype))

__all__ = [
    "CellWeights", "DARTS_OPS", "NB201_OPS", "DartsGenotype", "DartsNetwork", "DartsSupernet", "Genotype",
    "GenotypeError", "NB201Genotype", "NB201Network", "NB201Supernet", "SearchSpace", "count_macs",
    "count_parameters", "create", "create_network", "create_op", "derive_darts", "derive_nb201", "edge_names",
    "get_genotype",
    "get_space", "load_genotype_file", "op_names", "parse_genotype", "published_names", "register_genotype",
    "register_op", "register_space", "space_names",
]
