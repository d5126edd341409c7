"""Search under a budget: the cost model against the built networks, the device-side cost of
the genotype rule's cell, the dual ascent in every optimizer, and the settings' one-line errors."""
import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

import optimizers
import search_spaces
from optimizers.budget import BudgetSettings, CostBudget
from search_spaces.cost import CostError, CostTable, TargetNetwork, count_table, genotype_cost, random_genotype
from tests.helpers import ROOT, run_in_process, write_config

SMALL = {("darts", "cifar"): (8, 5), ("darts", "imagenet"): (8, 5), ("nas-bench-201", "cifar"): (8, 2)}
SUPERNETS = {"darts": {"C": 4, "layers": 3, "partial_channels": 2, "edge_normalization": True},
             "nas-bench-201": {"C": 4, "layers": 1}}


@pytest.mark.parametrize("metric", ["params", "macs"])
@pytest.mark.parametrize("space,variant", list(SMALL))
def test_cost_model_equals_what_the_built_network_counts(space, variant, metric):
    C, layers = SMALL[(space, variant)]
    target = TargetNetwork(space, C, layers, variant)
    table = count_table(target, metric)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        genotype = random_genotype(target, g)
        assert table.cost(genotype) == genotype_cost(target, genotype, metric), genotype.to_str()


def test_cost_model_at_the_protocol_size_counts_the_published_cell():
    target = TargetNetwork.default("darts")                       # C=36, 20 cells
    genotype = search_spaces.parse_genotype("DARTS_V2")
    assert count_table(target, "params").cost(genotype) == search_spaces.count_parameters(target.build(genotype))


def _random_rows(net, g):
    with torch.no_grad():
        for p in net.arch_parameters():
            r = torch.rand(p.shape, generator=g) ** 3
            p.copy_(r / r.sum(-1, keepdim=True))


@pytest.mark.parametrize("space,args", [("darts", {"edge_normalization": True}), ("darts", {"exclude_none": True}),
                                        ("nas-bench-201", {})])
def test_discrete_cost_on_the_device_is_the_genotype_rules_cell(space, args):
    net = search_spaces.create(space, **{**SUPERNETS[space], **args})
    table = count_table(TargetNetwork(space, *SMALL[(space, "cifar")]), "params")
    budget = CostBudget(table, 1.0e6, op_names=net.op_names)
    arch = optimizers.create("gaea", net, budget=budget)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        _random_rows(net, g)
        got = float(budget.discrete(arch.probabilities())) * budget.target
        assert got == pytest.approx(table.cost(arch.genotype()), rel=1e-6)


@pytest.mark.parametrize("space", ["darts", "nas-bench-201"])
def test_expected_cost_of_uniform_weights_is_the_mean_random_cell(space):
    """Uniform weights are the uniform distribution over cells (DARTS: two of a node's inputs,
    an op other than none on each): the expected cost matches the mean of 5000 drawn cells
    (within 4 standard errors)."""
    target = TargetNetwork(space, *SMALL[(space, "cifar")])
    table = count_table(target, "params")
    net = search_spaces.create(space, **SUPERNETS[space])
    budget = CostBudget(table, 1.0, op_names=net.op_names)
    expected = float(budget.expected(optimizers.create("gaea", net).probabilities()))
    g = torch.Generator().manual_seed(0)
    costs = torch.tensor([table.cost(random_genotype(target, g)) for _ in range(5000)], dtype=torch.float64)
    assert expected == pytest.approx(float(costs.mean()), abs=4 * float(costs.std()) / 5000 ** 0.5)


def test_the_cheapest_cell_is_no_dearer_than_any_drawn_cell():
    for space in ("darts", "nas-bench-201"):
        target = TargetNetwork(space, *SMALL[(space, "cifar")])
        table = count_table(target, "macs")
        cheapest, cell = table.cheapest()
        assert cheapest == table.cost(cell) == genotype_cost(target, cell, "macs")
        g = torch.Generator().manual_seed(0)
        assert all(table.cost(random_genotype(target, g)) >= cheapest for _ in range(200))


@pytest.mark.parametrize("bilevel", [True, False])
def test_budget_step_has_no_host_sync(bilevel):
    """The penalty, the dual step and the discrete cell's cost on the meta device (any host
    read raises there)."""
    net = search_spaces.create("darts", **SUPERNETS["darts"]).to("meta")
    table = count_table(TargetNetwork("darts", 8, 5), "params")
    arch = optimizers.create("gaea", net, budget=CostBudget(table, table.cheapest()[0] * 1.5, op_names=net.op_names,
                                                            device=torch.device("meta")))
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 16, 16, device="meta"), torch.randint(0, 10, (4,), device="meta")
    for _ in range(2):
        optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=sgd.step, check_finite=False)
    assert arch.budget.multiplier.device.type == "meta"


LEARN_SUPERNETS = {"darts": {"C": 4, "layers": 3, "nodes": 2, "multiplier": 2, "partial_channels": 2,
                              "edge_normalization": True},
                   "nas-bench-201": {"C": 4, "layers": 1}}


def _learn(space, method, steps=40, seed=0):
    """A tiny search on a learnable task, unconstrained and then with a parameter target half
    way from the cheapest cell to the unconstrained one (the tiny networks' cheapest cell is
    above 60% of a typical one); same seed and batches. Returns the target, the two returned
    cells' costs, the genotype rule's cell's cost under the budget and the multiplier."""
    target = TargetNetwork(space, *SMALL[(space, "cifar")], **({"nodes": 2, "multiplier": 2} if space == "darts"
                                                                else {}))
    table = count_table(target, "params")
    costs = {}
    for name in ("free", "budget"):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 3, 8, 8, generator=g)
        y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
        net = search_spaces.create(space, **LEARN_SUPERNETS[space], num_classes=4)
        budget = None
        if name == "budget":
            cheapest = table.cheapest(net.op_names)[0]
            budget = CostBudget(table, cheapest + 0.5 * (costs["free"] - cheapest), dual_lr=0.5,
                                op_names=net.op_names)
        arch = optimizers.create(method, net, {"lr": 1.0, "edge_lr": 1.0} if "gaea" in method else
                                 ({"lr": 0.05} if method in ("darts", "gdas") else None), seed=seed, budget=budget)
        sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9)

        def weight_step():
            sgd.step()
            sgd.zero_grad(set_to_none=True)

        for step in range(steps):
            arch.set_progress(step / steps)
            i = torch.randint(0, 64, (16,), generator=g)
            j = torch.randint(0, 64, (16,), generator=g)
            optimizers.search_step(net, arch, x[i], y[i], x[j], y[j], weight_step=weight_step)
        costs[name] = table.cost(arch.genotype())
    rule = table.cost(net.genotype(arch.probabilities()))
    return budget.target, costs["budget"], costs["free"], rule, float(arch.budget.multiplier)


@pytest.mark.slow
@pytest.mark.parametrize("space,method", [("nas-bench-201", m) for m in ("gaea", "darts", "gdas", "gaea_gdas")]
                         + [("darts", "gaea"), ("darts", "gdas")])
def test_every_optimizer_ends_within_the_budget(space, method):
    """The returned cell is within the target (repaired if the last step left the rule's cell
    over it); the dual ascent itself brought the rule's cell to within 10% of the target; the
    unconstrained search's cell is above it."""
    target, found, free, rule, multiplier = _learn(space, method)
    assert found <= target < free
    assert rule <= target * 1.10, (rule, target)
    assert multiplier >= 0


@pytest.mark.parametrize("space", ["darts", "nas-bench-201"])
def test_repair_keeps_a_cell_within_and_brings_one_over_within(space):
    net = search_spaces.create(space, **SUPERNETS[space])
    table = count_table(TargetNetwork(space, *SMALL[(space, "cifar")]), "params")
    cheapest = table.cheapest(net.op_names)[0]
    g = torch.Generator().manual_seed(0)
    repaired = 0
    arch = optimizers.create("gaea", net)
    for _ in range(10):
        _random_rows(net, g)
        probs = arch.probabilities()
        rule = net.genotype(probs)
        budget = CostBudget(table, cheapest + 0.3 * (table.cost(rule) - cheapest), op_names=net.op_names)
        fixed = budget.repair(rule, probs)
        assert table.cost(fixed) <= budget.target
        assert budget.repair(fixed, probs) == fixed               # a cell within is left as it is
        repaired += fixed != rule
        if space == "darts":
            for edges in (fixed.normal, fixed.reduce):
                assert all(edges[k][1] != edges[k + 1][1] for k in range(0, len(edges), 2))
                assert all(op != "none" for op, _ in edges)
    assert repaired == 10


def test_random_search_draws_only_cells_within_the_budget():
    net = search_spaces.create("nas-bench-201", **SUPERNETS["nas-bench-201"])
    table = count_table(TargetNetwork("nas-bench-201", 8, 2), "params")
    target = table.cheapest()[0] + 0.3 * (count_table(TargetNetwork("nas-bench-201", 8, 2), "params").cost(
        search_spaces.parse_genotype("NB201_RESNET")) - table.cheapest()[0])
    arch = optimizers.create("random", net, {"candidates": 5, "eval_batches": 1},
                             budget=CostBudget(table, target, op_names=net.op_names))
    drawn = [arch.sample()[1] for _ in range(50)]
    assert all(table.cost(c) <= target for c in drawn) and len({c.to_str() for c in drawn}) > 10
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    arch.select(net, [(x, y)])
    assert table.cost(arch.genotype()) <= target


def test_multiplier_survives_a_checkpoint():
    net = search_spaces.create("nas-bench-201", **SUPERNETS["nas-bench-201"])
    table = count_table(TargetNetwork("nas-bench-201", 8, 2), "params")
    a = optimizers.create("gaea", net, budget=CostBudget(table, table.cheapest()[0] * 1.2, op_names=net.op_names))
    a.budget.multiplier.fill_(0.7)
    state = a.state_dict()
    b = optimizers.create("gaea", net, budget=CostBudget(table, table.cheapest()[0] * 1.2, op_names=net.op_names))
    b.load_state_dict(state)
    assert float(b.budget.multiplier) == pytest.approx(0.7)


def test_dual_ascent_rises_over_budget_and_stops_at_zero_under_it():
    net = search_spaces.create("nas-bench-201", **SUPERNETS["nas-bench-201"])
    table = count_table(TargetNetwork("nas-bench-201", 8, 2), "params")
    arch = optimizers.create("gaea", net)
    with torch.no_grad():
        net.alphas_normal[:, net.op_names.index("nor_conv_3x3")] += 0.1     # every edge's argmax: a convolution
    dist = arch.probabilities()
    over = CostBudget(table, table.cheapest()[0] * 1.01, dual_lr=0.1, op_names=net.op_names)
    under = CostBudget(table, 1e9, dual_lr=0.1, op_names=net.op_names)
    for _ in range(3):
        over.ascend(dist)
        under.ascend(dist)
    violation = float(over.discrete(dist)) - 1
    assert float(over.multiplier) == pytest.approx(3 * 0.1 * violation) and violation > 0
    assert float(under.multiplier) == 0.0


# ----------------------------------------------------------------------- settings
def _search(tmp_path, budget, **hp):
    cfg = write_config(tmp_path / "exp.yaml", {"global_batch_size": 16, "space": "nas-bench-201",
                                               "space_args": {"C": 4, "layers": 1}, "optimizer": "gaea",
                                               "epochs": 2, "budget": budget, **hp},
                       {"dataset": "digits", "subset": 200})
    return run_in_process(str(cfg), "--max-batches", "4", "--output", str(tmp_path / "o"), cwd=tmp_path)


def _latency_table(path, **network):
    table = count_table(TargetNetwork(**{"space": "nas-bench-201", "init_channels": 16, "layers": 5,
                                         **network}), "params")
    CostTable("latency_ms", table.network, table.table, table.base, {"device": "cpu", "device_name": "x"}).save(path)
    return path


@pytest.mark.parametrize("budget,message", [
    ({"metric": "flops", "target": 1}, "budget: unknown metric 'flops'; valid metrics: params, macs, latency_ms"),
    ({"metric": "params", "target": 1000}, "below the cheapest cell of the nas-bench-201 space"),
    ({"metric": "params"}, "budget needs target"),
    ({"metric": "params", "target": -5}, "budget: target must be a number > 0, got -5"),
    ({"metric": "latency_ms", "target": 5}, "metric latency_ms needs `table`"),
    ({"metric": "latency_ms", "target": 1e9, "table": "darts.json"}, "is for search space 'darts'"),
    ({"metric": "latency_ms", "target": 1e9, "table": "c8.json"}, "was measured on nas-bench-201 cifar C=8 layers=5"),
    ({"metric": "latency_ms", "target": 1e9, "table": "ok.json", "device": "cuda"},
     "was measured on cpu, the budget says device 'cuda'"),
    ({"metric": "latency_ms", "target": 1e9, "table": "broken.json"}, "does not parse as JSON"),
])
def test_bad_budget_is_one_line(tmp_path, budget, message):
    _latency_table(tmp_path / "ok.json")
    _latency_table(tmp_path / "c8.json", init_channels=8)
    _latency_table(tmp_path / "darts.json", space="darts", init_channels=36, layers=20)
    (tmp_path / "broken.json").write_text("{not json")
    if "table" in budget:
        budget = {**budget, "table": str(tmp_path / budget["table"])}
    proc = _search(tmp_path, budget)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_cheapest_cell_is_named_when_the_target_is_too_low():
    table = count_table(TargetNetwork.default("nas-bench-201"), "params")
    with pytest.raises(CostError, match=r"cheapest cell .*: \d+ \(\|none~0\|"):
        BudgetSettings("params", 1000.0).cost_table("nas-bench-201", 10)
    assert table.cheapest()[0] > 1000


@pytest.mark.slow
def test_resumed_budgeted_search_equals_an_uninterrupted_one(tmp_path):
    """The multiplier is checkpointed: 3 batches, then 3 more from the checkpoint, end on the
    architecture weights, multiplier and cell of 6 straight batches."""
    from tests.helpers import checkpoints, straight_and_resumed

    budget = {"metric": "params", "target": count_table(TargetNetwork.default("nas-bench-201"), "params")
              .cheapest()[0] * 2}
    cfg = write_config(tmp_path / "exp.yaml", {"global_batch_size": 16, "space": "nas-bench-201",
                                               "space_args": {"C": 4, "layers": 1}, "optimizer": "gaea",
                                               "optimizer_args": {"gaea": {"lr": 5.0}}, "epochs": 2,
                                               "budget": budget}, {"dataset": "digits", "subset": 200})
    runs = straight_and_resumed(cfg, 3, 6, tmp_path, "--checkpoint-every", "3", "--validate-every", "3")
    ga, gb = (json.loads((checkpoints(r)[6] / "genotype.json").read_text()) for r in runs)
    assert ga["arch_weights"] == gb["arch_weights"] and ga["budget"] == gb["budget"]
    assert ga["budget"]["multiplier"] > 0


def test_search_reports_the_budget_and_writes_it_to_the_genotype(tmp_path):
    table = count_table(TargetNetwork.default("nas-bench-201"), "macs")
    target = table.cheapest()[0] * 3
    proc = _search(tmp_path, {"metric": "macs", "target": target}, validate_every=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    genotypes = sorted((tmp_path / "o" / "determined").glob("*/genotype.json"))
    record = json.loads(genotypes[-1].read_text())["budget"]
    cell = search_spaces.parse_genotype(json.loads(genotypes[-1].read_text())["genotype"])
    assert record["metric"] == "macs" and record["target"] == target
    assert record["cell"] == table.cost(cell) == genotype_cost(table.network, cell, "macs")
    assert record["within"] == (record["cell"] <= target)
    assert record["repaired"] == (record["rule_cell"] > target) and record["cell"] <= target
    assert "budget_cell" in proc.stdout and "budget_multiplier" in proc.stdout


# ------------------------------------------------------------------ latency tables
def test_latency_profile_writes_a_table_a_budget_reads(tmp_path, capsys):
    """``python -m search_spaces profile`` at a tiny size: a table whose predictions of the
    held-out cells are its own additive model, an error figure from real timings, and a table
    a latency budget accepts for that network and refuses for another."""
    from search_spaces.__main__ import main

    out = tmp_path / "lat.json"
    assert main(["profile", "--space", "nas-bench-201", "--init-channels", "4", "--layers", "1", "--warmup", "1",
                 "--repeats", "2", "--rounds", "2", "--genotypes", "3", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = CostTable.load(out)
    m = table.measured
    assert m["device"] == "cpu" and m["batch"] == 1 and m["precision"] == "fp32" and m["rounds"] == 2
    assert line["mape_percent"] == m["error"]["mape_percent"] >= 0 and len(m["error"]["measured_ms"]) == 3
    assert all(x > 0 for x in m["error"]["measured_ms"])
    for cell, predicted in zip(m["error"]["cells"], m["error"]["predicted_ms"]):
        assert table.cost(search_spaces.parse_genotype(cell)) == pytest.approx(predicted, abs=1e-3)
    settings = BudgetSettings("latency_ms", 1e6, table=str(out), init_channels=4, layers=1)
    assert settings.cost_table("nas-bench-201", 10).to_json() == table.to_json()
    with pytest.raises(CostError, match="was measured on nas-bench-201 cifar C=4 layers=1"):
        BudgetSettings("latency_ms", 1e6, table=str(out)).cost_table("nas-bench-201", 10)


# ----------------------------------------------------------------------- candidates
@pytest.mark.slow
def test_candidates_drop_cells_over_budget_and_draw_the_front(tmp_path):
    """Two tiny searches under a tight and a loose MAC target: --max-macs keeps the cells
    whose network, as the base retrains it, counts no more (the tight search's), and --front
    draws accuracy against cost."""
    from nas_trial.candidates import main

    table = count_table(TargetNetwork.default("nas-bench-201"), "macs")
    cheapest = table.cheapest()[0]
    for name, target in (("tight", cheapest * 1.5), ("loose", cheapest * 12)):
        run = tmp_path / name
        run.mkdir()
        assert _search(run, {"metric": "macs", "target": target}).returncode == 0
    records = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("*/o/determined/*/genotype.json"))]
    records = [r for r in records if not r.get("warmup")]
    assert all(r["budget"]["within"] and r["budget"]["cell"] <= r["budget"]["target"] for r in records)
    out = tmp_path / "c.yaml"
    args = [str(tmp_path / "tight" / "o"), str(tmp_path / "loose" / "o"), "--top", "10",
            "--base", str(ROOT / "experiments" / "retrain-nb201-asha.yaml"), "--output", str(out)]
    limit = cheapest * 1.5
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--max-macs", str(limit), "--front", str(tmp_path / "front.png")]) == 0
    kept = load_yaml(out)["hyperparameters"]["candidates"]["val"]
    assert {c["genotype"] for c in kept} == {r["genotype"] for r in records if r["budget"]["cell"] <= limit}
    assert all(genotype_cost(table.network, search_spaces.parse_genotype(c["genotype"]), "macs") <= limit
               for c in kept)
    assert all(c["budget_metric"] == "macs" and c["budget_cell"] <= limit for c in kept)
    assert (tmp_path / "front.png").stat().st_size > 0
    latency = CostTable.load(_latency_table(tmp_path / "lat.json"))       # the base's network: C=16, N=5
    cells = sorted({r["genotype"] for r in records}, key=lambda c: latency.cost(search_spaces.parse_genotype(c)))
    limit = latency.cost(search_spaces.parse_genotype(cells[len(cells) // 2]))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--max-latency-ms", str(limit), "--latency-table", str(tmp_path / "lat.json")]) == 0
    kept = {c["genotype"] for c in load_yaml(out)["hyperparameters"]["candidates"]["val"]}
    assert kept == {c for c in cells if latency.cost(search_spaces.parse_genotype(c)) <= limit}


def load_yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())
