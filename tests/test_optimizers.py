import copy
import math
import pickle

import pytest
import torch
from torch import nn

import optimizers
import search_spaces
from benchmarks.planted_ops import run as planted_run
from optimizers import ExponentiatedGradient, NonFiniteLossError, search_step


def simplex(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g) + 0.1
    return nn.Parameter(x / x.sum(-1, keepdim=True))


def step_with(opt, p, grad):
    p.grad = grad.clone()
    opt.step()


# ------------------------------------------------------------------------------- EG
def test_eg_rows_stay_on_simplex_under_huge_random_gradients():
    p = simplex(14, 8)
    opt = ExponentiatedGradient([p], lr=0.5)
    g = torch.Generator().manual_seed(1)
    for i in range(1000):
        scale = 10.0 ** torch.randint(-2, 5, (1,), generator=g).item()  # up to 1e4
        step_with(opt, p, scale * torch.randn(14, 8, generator=g))
        assert (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(14), atol=1e-6)
    assert (p >= 1e-5 * 0.99).all()  # the floor holds


def test_eg_zero_lr_and_zero_gradient_change_nothing():
    p = simplex(6, 5)
    before = p.detach().clone()
    step_with(ExponentiatedGradient([p], lr=0.0), p, torch.randn(6, 5))
    assert torch.equal(p.detach(), before)
    step_with(ExponentiatedGradient([p], lr=1.0), p, torch.zeros(6, 5))
    assert torch.allclose(p.detach(), before, atol=1e-7)


def test_eg_is_invariant_to_a_constant_added_to_a_row():
    p, q = simplex(6, 5), simplex(6, 5)
    g = torch.randn(6, 5)
    step_with(ExponentiatedGradient([p], lr=0.3), p, g)
    step_with(ExponentiatedGradient([q], lr=0.3), q, g + torch.arange(6.0).unsqueeze(1) * 7.0)
    assert torch.allclose(p, q, atol=1e-6)


def test_eg_step_matches_closed_form():
    p = simplex(4, 8, seed=3)
    theta = p.detach().double().clone()
    g = torch.randn(4, 8, dtype=torch.float64)
    step_with(ExponentiatedGradient([p], lr=0.7), p, g.float())
    expected = theta * torch.exp(-0.7 * g)
    expected = expected / expected.sum(-1, keepdim=True)
    assert expected.min() > 1e-3  # away from the floor
    assert torch.allclose(p.double(), expected, atol=1e-6)


def test_eg_entropic_regulariser_pulls_towards_uniform():
    p = simplex(3, 5, seed=4)
    ent = lambda t: -(t * t.log()).sum(-1)
    before = ent(p.detach())
    step_with(ExponentiatedGradient([p], lr=0.5, entropic_reg=1.0), p, torch.zeros(3, 5))
    assert (ent(p.detach()) > before).all()


def test_eg_state_dict_deepcopy_and_pickle_round_trips():
    p = simplex(5, 4)
    opt = ExponentiatedGradient([p], lr=0.2, floor=1e-4, entropic_reg=0.1)
    step_with(opt, p, torch.randn(5, 4))
    q = nn.Parameter(p.detach().clone())
    opt2 = ExponentiatedGradient([q], lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.2 and opt2.param_groups[0]["floor"] == 1e-4
    assert opt2.state[q]["step"] == 1
    g = torch.randn(5, 4)
    step_with(opt, p, g)
    step_with(opt2, q, g)
    assert torch.equal(p, q)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert all(clone.defaults[k] == v for k, v in opt.defaults.items())
        cp = clone.param_groups[0]["params"][0]
        assert torch.equal(cp, p) and clone.state[cp]["step"] == 2
        step_with(clone, cp, g)
        step_with(opt2, q, g)
        assert torch.equal(cp, q)
        q.data.copy_(p.detach())  # reset for the next clone
        opt2.load_state_dict(opt.state_dict())


def test_eg_is_driven_by_lr_schedulers():
    p = simplex(2, 3)
    opt = ExponentiatedGradient([p], lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step_with(opt, p, torch.zeros(2, 3))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    theta = p.detach().double().clone()
    g = torch.randn(2, 3, dtype=torch.float64)
    step_with(opt, p, g.float())
    expected = theta * torch.exp(-0.2 * g)
    assert torch.allclose(p.double(), expected / expected.sum(-1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [(dict(lr=-1.0), "learning rate"), (dict(floor=1.5), "floor"),
                                          (dict(entropic_reg=-0.1), "entropic_reg"), (dict(floor=0.3), "too large")])
def test_eg_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExponentiatedGradient([simplex(2, 4)], **kwargs)


def test_eg_rejects_parameters_off_the_simplex():
    with pytest.raises(ValueError, match="probability simplex"):
        ExponentiatedGradient([nn.Parameter(torch.randn(3, 4))])


# --------------------------------------------------------- architecture optimizers
def small(space):
    if space == "darts":
        return search_spaces.create("darts", C=8, layers=3, partial_channels=4, edge_normalization=True)
    return search_spaces.create("nas-bench-201", C=4, layers=1)


def test_registry_lists_valid_names():
    with pytest.raises(ValueError, match="unknown architecture optimizer 'gea'.*gaea, darts, gdas, gaea_gdas, random"):
        optimizers.create("gea", small("nas-bench-201"))


def test_misspelt_or_mistyped_settings_are_errors():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) 'lrr'.*valid settings: lr, edge_lr"):
        optimizers.create("gaea", small("nas-bench-201"), {"lrr": 0.1})
    with pytest.raises(ValueError, match="must be a number.*1.0e-3"):
        optimizers.create("darts", small("nas-bench-201"), {"lr": "1e-3"})
    with pytest.raises(ValueError, match="tau_min <= tau_max"):
        optimizers.create("gdas", small("nas-bench-201"), {"tau_min": 20.0})


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("space", ["darts", "nas-bench-201"])
@pytest.mark.parametrize("name", optimizers.names())
@pytest.mark.parametrize("bilevel", [True, False])
def test_every_optimizer_runs_three_search_steps(space, name, bilevel):
    net = small(space)
    arch = optimizers.create(name, net, seed=0)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    arch_before = [p.detach().clone() for p in net.arch_parameters()]
    w_before = [p.detach().clone() for p in net.weight_parameters()]
    seen = {}

    def weight_backward(loss):
        # the architecture step computed no weight gradients
        seen["weight_grads_before"] = [p.grad is None for p in net.weight_parameters()]
        loss.backward()

    def weight_step():
        if bilevel:  # the weight step computed no architecture gradients
            seen["arch_grads"] = [p.grad is None for p in net.arch_parameters()]
        nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    for i in range(3):
        arch.set_progress(i / 2)
        r = search_step(net, arch, *_batches(seed=i), weight_step=weight_step, weight_backward=weight_backward,
                        bilevel=bilevel)
        assert torch.isfinite(r.loss) and (r.arch_loss is None) == (not (bilevel and arch.learns))
    assert all(seen["weight_grads_before"])
    if bilevel:
        assert all(seen["arch_grads"])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(w_before, net.weight_parameters()))
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(arch_before, net.arch_parameters()))
    assert changed == arch.learns
    if name in ("gaea", "gaea_gdas"):
        for p in net.arch_parameters():
            assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-6) and (p > 0).all()
    g = arch.genotype()
    assert g.space == space
    assert type(g).from_str(g.to_str()) == g


@pytest.mark.parametrize("name", ["gaea", "darts", "gdas"])
@pytest.mark.parametrize("bilevel", [True, False])
def test_warm_up_steps_train_the_weights_and_leave_the_architecture(name, bilevel):
    net = small("darts")
    arch = optimizers.create(name, net, seed=0)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05)
    arch_before = [p.detach().clone() for p in net.arch_parameters()]
    w_before = [p.detach().clone() for p in net.weight_parameters()]
    x, y, xv, yv = _batches(seed=0)
    r = search_step(net, arch, x, y, xv, yv, weight_step=lambda: (sgd.step(), sgd.zero_grad()), bilevel=bilevel,
                    update_arch=False)
    assert r.arch_loss is None and torch.isfinite(r.loss)
    assert all(torch.equal(a, b.detach()) for a, b in zip(arch_before, net.arch_parameters()))
    assert all(p.grad is None for p in net.arch_parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(w_before, net.weight_parameters()))
    search_step(net, arch, x, y, xv, yv, weight_step=lambda: (sgd.step(), sgd.zero_grad()), bilevel=bilevel)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(arch_before, net.arch_parameters()))


def test_gdas_samples_one_op_per_edge_and_anneals_temperature():
    net = small("nas-bench-201")
    arch = optimizers.create("gdas", net, seed=0)
    assert arch.tau == pytest.approx(10.0)
    arch.set_progress(1.0)
    assert arch.tau == pytest.approx(0.1)
    cw = arch.weights()["normal"]
    assert all(len(a) == 1 for a in cw.active)
    chosen = torch.tensor([a[0] for a in cw.active])
    assert torch.allclose(cw.ops[torch.arange(6), chosen], torch.ones(6))
    assert cw.ops.requires_grad  # straight-through gradient to the logits


def test_sampling_is_seeded_and_resumes_from_state_dict():
    a = optimizers.create("gaea_gdas", small("nas-bench-201"), seed=7)
    b = optimizers.create("gaea_gdas", small("nas-bench-201"), seed=7)
    seq_a = [a.weights()["normal"].active for _ in range(3)]
    assert seq_a == [b.weights()["normal"].active for _ in range(3)]
    state = copy.deepcopy(a.state_dict())
    nxt = [a.weights()["normal"].active for _ in range(3)]
    c = optimizers.create("gaea_gdas", small("nas-bench-201"), seed=99)
    c.load_state_dict(state)
    assert nxt == [c.weights()["normal"].active for _ in range(3)]


def test_random_search_samples_valid_darts_cells_and_selects_the_best():
    net = small("darts")
    rs = optimizers.create("random", net, {"candidates": 5, "eval_batches": 2}, seed=0)
    weights, genotype = rs.sample()
    for ct in net.cell_types:
        active = weights[ct].active
        start = 0
        for i in range(4):
            assert sum(len(a) > 0 for a in active[start:start + i + 2]) == 2
            start += i + 2
    assert genotype.nodes == 4
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    bn_before = [b.clone() for n, b in net.named_buffers() if "running_mean" in n]
    results = rs.select(net, batches)
    assert len(results) == 5
    assert rs.genotype() == max(results, key=lambda r: (r["accuracy"], -r["loss"]))["genotype"]
    assert all(torch.equal(a, b) for a, b in zip(bn_before, [b for n, b in net.named_buffers() if "running_mean" in n]))
    restored = optimizers.create("random", small("darts"), {"candidates": 5, "eval_batches": 2}, seed=0)
    restored.load_state_dict(rs.state_dict())
    assert restored.genotype() == rs.genotype()


def test_non_finite_loss_stops_before_any_update():
    net = small("nas-bench-201")
    arch = optimizers.create("gaea", net)
    before = copy.deepcopy(net.state_dict())
    x, y, xv, yv = _batches()
    xv[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="the architecture loss is not finite"):
        search_step(net, arch, x, y, xv, yv, weight_step=lambda: None)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


@pytest.mark.parametrize("bilevel", [True, False])
def test_non_finite_architecture_gradient_is_caught_not_zeroed(bilevel):
    """A finite loss with an infinite architecture gradient: EG would clip it into a step; the
    search step reports it (raising, or as the device flag the trial reads when it reports)."""
    x, y, xv, yv = _batches()
    for check in (True, False):
        net = small("nas-bench-201")
        arch = optimizers.create("gaea", net)
        hooks = [p.register_hook(lambda g: g * float("inf")) for p in arch.parameters()]
        if check:
            with pytest.raises(NonFiniteLossError, match="an architecture gradient is not finite"):
                search_step(net, arch, x, y, xv, yv, weight_step=lambda: None, bilevel=bilevel)
        else:
            result = search_step(net, arch, x, y, xv, yv, weight_step=lambda: None, bilevel=bilevel,
                                 check_finite=False)
            assert torch.isfinite(result.loss) and not bool(result.finite)
        for h in hooks:
            h.remove()
    ok = search_step(net, arch, x, y, xv, yv, weight_step=lambda: None, bilevel=bilevel, check_finite=False)
    assert bool(ok.finite)


def test_entropy_stats():
    probs = {"normal": search_spaces.CellWeights(torch.full((6, 5), 0.2))}
    s = optimizers.entropy_stats(probs)
    assert s["arch_entropy"] == pytest.approx(math.log(5)) and s["arch_max_weight"] == pytest.approx(0.2)


# ------------------------------------------------------------------ planted-op toy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaea_finds_planted_ops_and_gets_sparse_faster_than_darts(seed):
    budget = 150
    gaea = planted_run("gaea", None, steps=budget, seed=seed)
    assert gaea["all_edges_above_0.9"] and gaea["argmax_is_planted"], gaea
    darts_default = planted_run("darts", None, steps=budget, seed=seed)
    darts_fast = planted_run("darts", {"lr": 0.1}, steps=budget, seed=seed)
    # what holds in benchmarks/planted_ops.py's measurements: DARTS with its paper settings is
    # nowhere near 0.9 after the same budget, and GAEA's weights have lower entropy than
    # DARTS's even with a 300x larger Adam step
    assert darts_default["planted_weight_min"] < 0.9
    assert gaea["entropy"] < darts_fast["entropy"] < darts_default["entropy"]


def _digits_tensors(split):
    from nas_data import load
    data = load("digits", None, split)
    x = torch.tensor(data.images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0 - 0.5   # (N, 3, 8, 8)
    return x, torch.tensor(data.labels)


def test_random_search_ranks_a_planted_trained_path_first():
    """Only the planted path's weights were trained; scored on class-mixed held-out batches with
    batch statistics, it must come first among 30 random candidates, clearly above the rest."""
    torch.manual_seed(0)
    net = search_spaces.create("nas-bench-201", C=8, layers=1)
    rs = optimizers.create("random", net, {"candidates": 30, "eval_batches": 4}, seed=0)
    conv = net.op_names.index("nor_conv_3x3")
    planted_ops = torch.zeros(6, len(net.op_names))
    planted_ops[:, conv] = 1.0
    planted = {"normal": search_spaces.CellWeights(planted_ops, active=((conv,),) * 6)}
    x, y = _digits_tensors("train")
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for step in range(150):
        i = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(net(x[i], planted), y[i])
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    xt, yt = _digits_tensors("test")
    order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(1))[:256]
    batches = [(xt[order[k:k + 64]], yt[order[k:k + 64]]) for k in range(0, 256, 64)]
    candidates = [(planted, net.genotype(planted))] + [rs.sample() for _ in range(30)]
    results = rs.select(net, batches, architectures=candidates)
    accs = sorted((r["accuracy"] for r in results[1:]), reverse=True)
    assert rs.best["genotype"] == net.genotype(planted)
    # candidates share the trained convolutions on some edges, so the runner-up is close
    assert results[0]["accuracy"] > 0.9 and results[0]["accuracy"] > accs[0] + 0.03, (results[0], accs[:3])
    assert results[0]["accuracy"] > accs[len(accs) // 2] + 0.2


def test_held_out_samples_mix_classes_where_prefixes_do_not():
    """The search's held-out half keeps the stored class order (image folders are stored class
    by class); the random-search selection draws a seeded sample of it instead of a prefix."""
    from nas_data import DataConfig, build_search_data, sample_indices
    from tests.conftest import require_cifar
    data = build_search_data(DataConfig(dataset="image_folder", root=str(require_cifar()), subset=2000), seed=0)
    heldout = data.heldout
    labels = [heldout[i][1] for i in range(64)]
    assert len(set(labels)) == 1                                   # the hazard: a prefix is one class
    idx = sample_indices(len(heldout), 4 * 64, seed=0)
    assert len(set(idx.tolist())) == 256 and list(idx) == list(sample_indices(len(heldout), 4 * 64, seed=0))
    for k in range(4):
        assert len({heldout[int(i)][1] for i in idx[k * 64:(k + 1) * 64]}) >= 8


def _supernet_by_edges(net, x, edge):
    """The NAS-Bench-201 supernet with each search cell written out: node i is the sum over
    j < i of ``edge(cell, e, node_j)`` (e: the edge i<-j's index); the rest as the supernet's."""
    from search_spaces.nb201 import NB201SearchCell
    h = net.stem(x)
    for layer in net.layers:
        if not isinstance(layer, NB201SearchCell):
            h = layer(h)
            continue
        nodes, e = [h], 0
        for i in range(1, 4):
            node = 0
            for j in range(i):
                node = node + edge(layer, e, nodes[j])
                e += 1
            nodes.append(node)
        h = nodes[-1]
    return net.classifier(net.global_pooling(net.lastact(h)).flatten(1))


def _reference_gdas_nb201(net, x, cw):
    """The reference GDAS forward on NAS-Bench-201 (D-X-Y's ``forward_gdas``), written out:
    per edge ``w[argmax] * op_argmax(x) + sum_{k != argmax} w[k]``."""
    return _supernet_by_edges(net, x, lambda cell, e, h: sum(
        cw.ops[e, q] * cell.edges[e].ops[q](h) if q == cw.active[e][0] else cw.ops[e, q]
        for q in range(cw.ops.shape[1])))


@pytest.mark.parametrize("name", ["gdas", "gaea_gdas"])
def test_gdas_gradients_match_the_reference_formula_on_nas_bench_201(name):
    torch.manual_seed(0)
    net = search_spaces.create("nas-bench-201", C=4, layers=1).double()
    arch = optimizers.create(name, net, seed=3)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    cw = arch.weights()["normal"]
    assert len({a[0] for a in cw.active}) > 1
    params = [*arch.parameters(), *net.weight_parameters()]
    mine = torch.autograd.grad(nn.functional.cross_entropy(net(x, {"normal": cw}), y), params, allow_unused=True,
                               materialize_grads=True, retain_graph=True)
    ref_logits = _reference_gdas_nb201(net, x, cw)
    torch.testing.assert_close(net(x, {"normal": cw}), ref_logits, rtol=1e-9, atol=1e-10)
    theirs = torch.autograd.grad(nn.functional.cross_entropy(ref_logits, y), params, allow_unused=True,
                                 materialize_grads=True)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # every op's logit gets a gradient, not only the sampled ones'
    assert (mine[0] != 0).all()


# --------------------------------------------------- NAS-Bench-201 against a plain implementation
def _plain_op(name, module, x):
    """NAS-Bench-201's ops from their definitions, with the module's parameters only."""
    if name == "none":
        return torch.zeros_like(x)
    if name == "skip_connect":
        return x
    if name == "avg_pool_3x3":
        return nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    conv, bn = module[1], module[2]                    # nor_conv_*: ReLU, conv, batch norm (batch statistics)
    y = nn.functional.conv2d(torch.relu(x), conv.weight, None, 1, conv.padding)
    return nn.functional.batch_norm(y, None, None, training=True, eps=bn.eps)


def _plain_supernet(net, x, w):
    """The supernet edge by edge: edge i<-j = sum_k w[e, k] op_k(node j), ops as defined."""
    return _supernet_by_edges(net, x, lambda cell, e, h: sum(
        w[e, k] * _plain_op(name, cell.edges[e].ops[k], h) for k, name in enumerate(net.op_names)))


@pytest.mark.parametrize("bilevel", [True, False])
def test_nas_bench_201_gaea_step_matches_a_plain_float64_implementation(bilevel):
    """The supernet (fused kernels, channels-last, shared pooling) and one whole GAEA update
    (architecture and weights) against the plain per-edge formulation with autograd gradients
    and the exponentiated-gradient rule written by hand."""
    torch.manual_seed(0)
    net = optimizers.prepare_supernet(search_spaces.create("nas-bench-201", C=4, layers=1).double())
    arch = optimizers.create("gaea", net, {"lr": 0.5}, seed=0)
    with torch.no_grad():                              # a non-uniform start: every op weighted differently
        theta = torch.rand(6, 5, dtype=torch.float64) + 0.05
        net.alphas_normal.copy_(theta / theta.sum(-1, keepdim=True))
    lr_w = 0.1
    sgd = torch.optim.SGD(net.weight_parameters(), lr=lr_w)
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    y, yv = torch.randint(0, 10, (8,), generator=g), torch.randint(0, 10, (8,), generator=g)
    weights = list(net.weight_parameters())
    theta0, w0 = net.alphas_normal.detach().clone(), [p.detach().clone() for p in weights]

    # the plain formulation, by hand
    theta_p = theta0.clone().requires_grad_()
    a_x, a_y = (xv, yv) if bilevel else (x, y)
    (g_theta,) = torch.autograd.grad(nn.functional.cross_entropy(_plain_supernet(net, a_x, theta_p), a_y), [theta_p])
    theta1 = theta0 * torch.exp(-0.5 * g_theta)
    theta1 = theta1 / theta1.sum(-1, keepdim=True)
    w_theta = theta1 if bilevel else theta0            # bilevel: the weights step under the updated architecture
    g_w = torch.autograd.grad(nn.functional.cross_entropy(_plain_supernet(net, x, w_theta), y), weights,
                              allow_unused=True, materialize_grads=True)
    w1 = [p - lr_w * gp for p, gp in zip(w0, g_w)]

    # the project's step
    torch.testing.assert_close(net(x, arch.weights()), _plain_supernet(net, x, theta0), rtol=1e-10, atol=1e-12)
    search_step(net, arch, x, y, xv, yv, weight_step=lambda: (sgd.step(), sgd.zero_grad()), bilevel=bilevel)
    torch.testing.assert_close(net.alphas_normal.detach(), theta1, rtol=1e-10, atol=1e-12)
    for p, expected in zip(weights, w1):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-11)
