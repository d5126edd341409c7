import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import search_spaces
from search_spaces import (CellWeights, DARTS_OPS, NB201_OPS, DartsGenotype, GenotypeError, NB201Genotype,
                           count_macs, count_parameters, create, create_network, create_op, get_genotype,
                           parse_genotype, published_names)
from search_spaces.darts import channel_shuffle_cat
from tests.conftest import ROOT, cuda

ALL_OPS = sorted(set(DARTS_OPS) | set(NB201_OPS))


@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_op_shapes(name, stride):
    op = create_op(name, 8, stride, affine=False)
    x = torch.randn(2, 8, 16, 16)
    assert op(x).shape == (2, 8, 16 // stride, 16 // stride)


def test_unknown_op_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'.*sep_conv_3x3"):
        create_op("conv_9x9", 8, 1)


def test_unknown_space_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown search space 'nasbench'.*darts.*nas-bench-201"):
        create("nasbench")


def darts_small(**kw):
    args = dict(C=8, num_classes=10, layers=3)
    args.update(kw)
    return create("darts", **args)


@pytest.mark.parametrize("kw", [dict(), dict(partial_channels=4, edge_normalization=True),
                                dict(partial_channels=2, exclude_none=True)])
def test_darts_supernet_forward_backward(kw):
    net = darts_small(**kw)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.arch_parameters())
    assert sum(p.grad is not None for p in net.weight_parameters()) > 0
    # 14 edges x 8 ops per cell type, one row per node for edge weights
    assert net.alphas_normal.shape == (14, len(net.op_names)) == net.alphas_reduce.shape
    if kw.get("edge_normalization"):
        assert [b.shape[0] for b in net.betas_normal] == [2, 3, 4, 5]


@pytest.mark.parametrize("exclude_none", [False, True])
def test_nb201_supernet_forward_backward(exclude_none):
    net = create("nas-bench-201", C=4, layers=1, exclude_none=exclude_none)
    assert net.alphas_normal.shape == (6, 4 if exclude_none else 5)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    nn.functional.cross_entropy(net(x), y).backward()
    assert net.alphas_normal.grad is not None
    if not exclude_none:  # the none op's output is zero, so its gradient is exactly zero
        assert torch.all(net.alphas_normal.grad[:, 0] == 0)


@pytest.mark.parametrize("space,kw", [("darts", dict(C=8, layers=3, partial_channels=4, edge_normalization=True)),
                                      ("nas-bench-201", dict(C=4, layers=1))])
def test_arch_and_weight_parameters_partition_the_model(space, kw):
    net = create(space, **kw)
    arch = {id(p) for p in net.arch_parameters()}
    weights = {id(p) for p in net.weight_parameters()}
    assert arch and weights and not arch & weights
    assert arch | weights == {id(p) for p in net.parameters()}
    assert all(isinstance(p, nn.Parameter) for p in net.arch_parameters())


def _ops_that_ran(net):
    """(edge path, op index) of every op whose batch norms counted a batch (every DARTS op
    but the stride-1 skip and ``none`` ends in one; the edges leaving a node run their ops
    together, without the ops' own forward)."""
    ran = set()
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d) and ".ops." in name and int(m.num_batches_tracked) > 0:
            edge, rest = name.split(".ops.", 1)
            ran.add((edge, rest.split(".")[0]))
    return ran


def test_zero_weight_and_none_ops_are_skipped():
    net = darts_small(partial_channels=4, edge_normalization=True)
    n_ops = len(net.op_names)
    sep, skip = net.op_names.index("sep_conv_3x3"), net.op_names.index("skip_connect")
    weights = {}
    for ct in net.cell_types:
        w = torch.zeros(14, n_ops)
        w[:, sep] = 0.5
        w[:, net.op_names.index("none")] = 0.5  # non-zero weight, but none has no output
        w[3] = 0.0
        w[3, skip] = 1.0
        weights[ct] = CellWeights(w.requires_grad_(), [torch.full((i + 2,), 1.0 / (i + 2)) for i in range(4)])
    out = net(torch.randn(2, 3, 16, 16), weights)
    # cell 0 is normal (its edge-3 skip is the identity: no norm), cells 1 and 2 reduce
    # (edge 3 reads a cell input, so its skip is a factorized reduce, with a norm)
    expected = {(f"cells.{c}.edges.{e}", str(sep)) for c in range(3) for e in range(14) if e != 3}
    expected |= {(f"cells.{c}.edges.3", str(skip)) for c in (1, 2)}
    assert _ops_that_ran(net) == expected
    out.sum().backward()
    edge0 = net.cells[0].edges[0].ops
    assert all(p.grad is not None for p in edge0[sep].parameters())
    assert all(p.grad is None for k in range(n_ops) if k != sep for p in edge0[k].parameters())
    assert all(p.grad is None for p in net.cells[0].edges[3].ops[sep].parameters())
    # the identity skip on cell 0's edge 3 ran: its weight gets a gradient
    assert weights["normal"].ops.grad[3, skip] != 0


def test_sampled_architecture_computes_one_op_per_edge():
    net = create("nas-bench-201", C=4, layers=1)
    idx = [1, 2, 3, 4, 2, 1]  # skip, conv 1x1, conv 3x3, avg pool, conv 1x1, skip
    w = torch.nn.functional.one_hot(torch.tensor(idx), 5).float().requires_grad_()
    out = net(torch.randn(2, 3, 8, 8), {"normal": CellWeights(w, active=tuple((k,) for k in idx))})
    convs = {e for e, k in enumerate(idx) if net.op_names[k].startswith("nor_conv")}
    assert _ops_that_ran(net) == {(f"layers.{c}.edges.{e}", str(idx[e])) for c in (0, 2, 4) for e in convs}
    out.sum().backward()
    for e, k in enumerate(idx):  # the sampled op's weight gets its gradient; the others, as in the
        others = w.grad[e, torch.arange(5) != k]  # reference GDAS cell, all the node's upstream gradient sum
        assert w.grad[e, k] != 0 and torch.all(others == others[0]) and others[0] != 0
    for c in (0, 2, 4):
        for e, edge in enumerate(net.layers[c].edges):
            for k, op in enumerate(edge.ops):
                assert all((p.grad is not None) == (k == idx[e]) for p in op.parameters())


def _reference_pc_node(cell, states, op_w, edge_w, node):
    """PC-DARTS as published: per edge, ops on 1/K channels, concatenate, shuffle, then weight."""
    K, q = cell.K, states[0].shape[1] // cell.K
    e0 = sum(i + 2 for i in range(node))
    total = 0
    for j, h in enumerate(states):
        edge = cell.edges[e0 + j]
        part = sum(op_w[e0 + j][k] * op(h[:, :q]) for k, op in enumerate(edge.ops) if cell_op_name(cell, k) != "none")
        rest = h[:, q:]
        if cell.reduction and j < 2:
            rest = nn.functional.max_pool2d(rest, 2, 2)
        ans = torch.cat([part, rest], 1)
        B, C, H, W = ans.shape
        ans = ans.view(B, K, C // K, H, W).transpose(1, 2).contiguous().view(B, C, H, W)
        total = total + edge_w[node][j] * ans
    return total


def cell_op_name(cell, k):
    return DARTS_OPS[k]


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("reduction", [False, True])
def test_pc_darts_cell_matches_the_published_formulation(reduction, train, sampled):
    """Outputs and, in training mode (batch statistics, the edges leaving a node computed
    together, fused weight-times-norm kernels), the gradients too; with dense weights and
    with one sampled op per edge (GDAS: different edges of a group run different ops)."""
    from search_spaces.darts import SearchCell, edge_groups
    from search_spaces.mixed import PreparedCellWeights
    torch.manual_seed(1)
    cell = SearchCell(16, 16, 16, reduction, False, DARTS_OPS, nodes=4, multiplier=4, partial_channels=4).double()
    cell.train(train)
    s0, s1 = torch.randn(2, 16, 8, 8, dtype=torch.float64), torch.randn(2, 16, 8, 8, dtype=torch.float64)
    op_w = torch.softmax(torch.randn(14, 8, dtype=torch.float64), -1)
    if sampled:
        op_w = nn.functional.one_hot(torch.randint(1, 8, (14,)), 8).double()
    op_w.requires_grad_(train)
    edge_w = [torch.softmax(torch.randn(i + 2, dtype=torch.float64), -1).requires_grad_(train) for i in range(4)]
    with torch.set_grad_enabled(train):
        groups = [[e for _, e in pairs] for pairs in edge_groups(4)]
        order = torch.tensor([e for g in groups for e in g])
        out = cell(s0, s1, PreparedCellWeights(CellWeights(op_w, edge_w), 0, order, [len(g) for g in groups]))
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        for node in range(4):
            states.append(_reference_pc_node(cell, states, op_w, edge_w, node))
        ref = torch.cat(states[-4:], 1)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    if train:
        g = torch.randn_like(ref)
        inputs = [op_w, *edge_w, *cell.parameters()]
        mine = torch.autograd.grad(out, inputs, g, allow_unused=True, materialize_grads=True)
        theirs = torch.autograd.grad(ref, inputs, g)
        if sampled:  # ops not computed have no gradient, as in the GDAS reference's DARTS-space cell
            active = op_w.detach() != 0
            theirs = (torch.where(active, theirs[0], 0.0), *theirs[1:])
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_pooling_runs_once_per_node_not_per_edge():
    net = create("nas-bench-201", C=4, layers=1)
    pools = []
    for m in net.modules():
        if type(m).__name__ == "AvgPool3x3":
            m.register_forward_hook(lambda mod, i, o: pools.append(o))
    net(torch.randn(2, 3, 8, 8))
    assert len(pools) == 3 * 3  # 3 cells x 3 nodes with outgoing edges (6 edges each)


def test_channel_shuffle_cat_is_cat_then_shuffle():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 9, 4, 4)
    x = torch.cat([a, b], 1)
    ref = x.view(2, 4, 3, 4, 4).transpose(1, 2).reshape(2, 12, 4, 4)
    assert torch.equal(channel_shuffle_cat(a, b, 4), ref)


# ------------------------------------------------------------------------------ genotypes
@pytest.mark.parametrize("name", published_names())
def test_published_genotypes_round_trip(name):
    g = get_genotype(name)
    assert type(g).from_str(g.to_str()) == g
    assert type(g).from_json(json.loads(json.dumps(g.to_json()))) == g
    assert parse_genotype(name) == g


def test_darts_string_form_is_the_darts_codes():
    s = get_genotype("DARTS_V2").to_str()
    assert s.startswith("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1),")
    assert s.endswith("reduce_concat=[2, 3, 4, 5])")
    legacy = s.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=range(2, 6)")
    assert DartsGenotype.from_str(legacy) == get_genotype("DARTS_V2")


def test_nb201_arch_string_round_trip():
    s = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
    g = NB201Genotype.from_str(s)
    assert g.to_str() == s
    assert [op for op, _ in g.edges] == ["nor_conv_3x3"] * 3 + ["skip_connect", "nor_conv_3x3", "nor_conv_3x3"]


@pytest.mark.parametrize("text,match", [
    ("Genotype(normal=[('sep_conv_3x3', 0)", "syntax error"),
    ("Genotype(normal=[], reduce=[])", "fields"),
    ("Genotype(normal=[('conv_9x9', 0), ('sep_conv_3x3', 1)], normal_concat=[2], reduce=[('sep_conv_3x3', 0), "
     "('sep_conv_3x3', 1)], reduce_concat=[2])", "unknown op 'conv_9x9'"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], normal_concat=[2], reduce=[('sep_conv_3x3', 0), "
     "('sep_conv_3x3', 1)], reduce_concat=[2])", "node 2 can only take inputs 0..1"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[7], reduce=[('sep_conv_3x3', 0), "
     "('sep_conv_3x3', 1)], reduce_concat=[2])", "normal_concat"),
    ("Genotype(normal=__import__('os'), normal_concat=[2], reduce=[], reduce_concat=[2])", "not a literal"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|", "node 2"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|sep_conv_3x3~1|none~2|", "unknown op 'sep_conv_3x3'"),
    ("|nor_conv_3x3-0|+|none~0|none~1|+|none~0|none~1|none~2|", "not op~input"),
    ("|nor_conv_3x3~0|+|none~0|none~1|", "3 nodes"),
    ("DARTS_V3", r"published name \(DARTS_V1, DARTS_V2"),
    ("missing/genotype.json", "does not exist"),
])
def test_malformed_genotypes_get_clear_errors(text, match):
    with pytest.raises(GenotypeError, match=match) as info:
        parse_genotype(text)
    assert "\n" not in str(info.value)


def test_genotype_of_the_other_space_is_rejected():
    with pytest.raises(GenotypeError, match="belongs to the darts search space"):
        parse_genotype("DARTS_V2", space="nas-bench-201")


def test_genotype_json_file(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps({"step": 3, **get_genotype("PC_DARTS").to_json()}))
    assert parse_genotype(str(path), space="darts") == get_genotype("PC_DARTS")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GenotypeError, match="not valid JSON"):
        parse_genotype(str(tmp_path / "bad.json"))


def test_darts_derivation_from_hand_made_weights():
    ops = list(DARTS_OPS)
    w = np.full((14, 8), 0.01)
    w[:, 0] = 0.9  # 'none' dominates every edge but must never be picked
    plan = {0: ("sep_conv_3x3", 0.5), 1: ("skip_connect", 0.4),         # node 2: inputs 0, 1
            2: ("max_pool_3x3", 0.1), 3: ("dil_conv_3x3", 0.6), 4: ("sep_conv_5x5", 0.7),   # node 3: 2 and 1
            5: ("avg_pool_3x3", 0.3), 8: ("dil_conv_5x5", 0.35),                # node 4: inputs 0 and 3
            9: ("sep_conv_3x3", 0.2), 13: ("skip_connect", 0.8), 12: ("max_pool_3x3", 0.5)}  # node 5: 4 and 3
    for e, (op, v) in plan.items():
        w[e, ops.index(op)] = v
    g = search_spaces.derive_darts(w, w, ops)
    expected = (("sep_conv_3x3", 0), ("skip_connect", 1), ("sep_conv_5x5", 2), ("dil_conv_3x3", 1),
                ("dil_conv_5x5", 3), ("avg_pool_3x3", 0), ("skip_connect", 4), ("max_pool_3x3", 3))
    assert g.normal == expected == g.reduce
    assert all(op != "none" for op, _ in g.normal)


def test_darts_derivation_uses_edge_weights():
    w = np.full((14, 8), 0.1)
    w[0, 4], w[1, 4], w[2, 5] = 0.5, 0.4, 0.3    # node 2 prefers inputs 0, 1 by op weight ...
    w[3, 4], w[4, 4] = 0.2, 0.2
    edges = [np.array([0.1, 0.9]), np.array([0.8, 0.1, 0.1]), np.ones(4) / 4, np.ones(5) / 5]
    cell = search_spaces.genotypes.derive_darts_cell(w, DARTS_OPS, edges)
    # node 3: op strengths (0.3, 0.2, 0.2) times edge weights (0.8, 0.1, 0.1): inputs 0 then 1
    assert cell[2:4] == (("sep_conv_5x5", 0), ("sep_conv_3x3", 1))


def test_nb201_derivation_is_argmax_per_edge():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.0], [0.9, 0, 0, 0, 0.1], [0, 1, 0, 0, 0],
                      [0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]])
    g = search_spaces.derive_nb201(w)
    assert g.to_str() == "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|avg_pool_3x3~1|nor_conv_3x3~2|"


def test_supernet_genotype_method():
    net = darts_small(partial_channels=4, edge_normalization=True)
    g = net.genotype(net.raw_weights())
    assert isinstance(g, DartsGenotype) and g.nodes == 4


# -------------------------------------------------------------------- discrete networks
def test_darts_v2_has_the_published_parameter_count():
    net = create_network(get_genotype("DARTS_V2"), C=36, layers=20, num_classes=10, auxiliary=True)
    assert count_parameters(net) == 3_349_342        # DARTS paper: 3.3M
    assert count_parameters(net, include_auxiliary=True) > 3_349_342


def test_gaea_pc_darts_cell_has_the_reported_size():
    net = create_network(get_genotype("GAEA_PC_DARTS"), C=36, layers=20)
    assert 3.65e6 < count_parameters(net) < 3.75e6   # GAEA paper: 3.7M


def test_darts_network_train_and_eval_outputs():
    net = create_network(get_genotype("PC_DARTS"), C=8, layers=5, num_classes=10, auxiliary=True, drop_path_prob=0.2)
    x = torch.randn(2, 3, 32, 32)
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    net.eval()
    logits, aux = net(x)
    assert aux is None and logits.shape == (2, 10)


def test_darts_imagenet_variant():
    net = create_network(get_genotype("DARTS_V2"), C=8, layers=5, num_classes=7, variant="imagenet", auxiliary=True)
    logits, aux = net(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 7) and aux.shape == (2, 7)


def test_nb201_network():
    g = parse_genotype("|nor_conv_3x3~0|+|none~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|")
    net = create_network(g, C=4, layers=2, num_classes=5)
    logits, aux = net(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 5) and aux is None
    assert count_macs(net, (1, 3, 16, 16)) > 0


@pytest.mark.parametrize("space,kw", [("darts", dict(C=8, layers=3, partial_channels=4, edge_normalization=True)),
                                      ("nas-bench-201", dict(C=4, layers=1))])
def test_supernet_state_dict_round_trip(space, kw):
    a, b = create(space, **kw), create(space, **kw)
    x = torch.randn(2, 3, 16, 16)
    a.train()
    a(x)  # move the BN running statistics
    with torch.no_grad():
        for p in a.arch_parameters():
            p.copy_(torch.rand_like(p))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


def test_network_state_dict_round_trip():
    g = get_genotype("DARTS_V1")
    a, b = (create_network(g, C=8, layers=5) for _ in range(2))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x)[0], b(x)[0])


def test_describe_command():
    out = subprocess.run([sys.executable, "-m", "search_spaces", "describe", "DARTS_V2", "--init-channels", "36",
                          "--layers", "20"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert d["params_millions"] == 3.349 and d["params"] < d["params_with_auxiliary"]
    assert 500e6 < d["macs_32x32"] < 560e6
    assert parse_genotype(d["genotype"]) == get_genotype("DARTS_V2")
    bad = subprocess.run([sys.executable, "-m", "search_spaces", "describe", "|bad|"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "malformed" in bad.stderr


def test_core_packages_do_not_import_determined():
    for pkg in ("search_spaces", "optimizers"):
        for path in (ROOT / pkg).glob("*.py"):
            text = path.read_text()
            assert "import determined" not in text and "from determined" not in text, path


@cuda
def test_supernets_and_networks_on_cuda():
    dev = torch.device("cuda")
    for space, kw in [("darts", dict(C=8, layers=3, partial_channels=4, edge_normalization=True)),
                      ("nas-bench-201", dict(C=4, layers=1))]:
        net = create(space, **kw).to(dev)
        nn.functional.cross_entropy(net(torch.randn(2, 3, 16, 16, device=dev)), torch.tensor([0, 1], device=dev)).backward()
        assert all(p.grad is not None for p in net.arch_parameters())
    net = create_network(get_genotype("DARTS_V2"), C=8, layers=5).to(dev)
    assert net(torch.randn(2, 3, 32, 32, device=dev))[0].shape == (2, 10)
