"""The CUDA path, proven on the CPU: a search step with no host synchronisation (run on the
meta device, where any host read raises), bf16 steps in which every convolution and matrix
product gets one dtype (the device-agnostic path, CUDA's, computed on the CPU under autocast,
and the CPU path), and a compiled supernet that does not recompile as the weights change."""
import pytest
import torch
import torch.nn.functional as F

import optimizers
import search_spaces
from nas_trial.train_metrics import DeviceMeans
from optimizers.audit import SavedBytes, StepAudit
from search_spaces import cpu_kernels

TINY = {"darts": {"C": 4, "layers": 3, "nodes": 2, "multiplier": 2, "partial_channels": 2, "edge_normalization": True},
        "nas-bench-201": {"C": 4, "layers": 1}}


def _setup(space, method, device="cpu", compile=False):
    torch.manual_seed(0)
    net = search_spaces.create(space, **TINY[space]).to(device)
    if compile:
        optimizers.prepare_supernet(net, compile=compile)
    arch = optimizers.create(method, net, seed=0)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)

    def weight_step():
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16, generator=g).to(device), torch.randint(0, 10, (4,), generator=g).to(device)
    return net, arch, weight_step, x, y


def test_the_meta_device_refuses_host_reads():
    t = torch.ones((), device="meta")
    for read in (lambda: t.item(), lambda: float(t), lambda: t.tolist(), lambda: bool(t > 0), lambda: t.cpu()):
        with pytest.raises((NotImplementedError, RuntimeError)):
            read()


@pytest.mark.parametrize("bilevel", [True, False], ids=["bilevel", "single_level"])
@pytest.mark.parametrize("method", ["gaea", "darts"])
@pytest.mark.parametrize("space", ["darts", "nas-bench-201"])
def test_search_step_without_host_sync(space, method, bilevel):
    """Two steps as the trial runs them (finite check as a device flag, metrics to a device
    reducer), weight clipping and momentum included, every tensor on the meta device."""
    net, arch, weight_step, x, y = _setup(space, method, "meta")
    means = DeviceMeans()
    for step in range(2):
        arch.set_progress(step / 2)
        r = optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=weight_step,
                                   check_finite=False)
        means.update({"loss": r.loss, "train_accuracy": r.accuracy, "arch_loss": r.arch_loss})
        assert r.finite.device.type == "meta" and r.loss.device.type == "meta"
    assert all(p.device.type == "meta" for p in net.parameters())


def test_the_mixed_dtype_check_sees_a_mixed_convolution():
    audit = StepAudit()
    with audit, pytest.raises(RuntimeError):
        F.conv2d(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16), torch.randn(4, 3, 3, 3))
    assert audit.mixed == [("convolution", ("torch.bfloat16", "torch.float32"))]


@pytest.mark.parametrize("path", ["cpu", "device-agnostic"])
@pytest.mark.parametrize("method", ["gaea", "darts"])
@pytest.mark.parametrize("space", ["darts", "nas-bench-201"])
def test_bf16_step_gives_each_convolution_and_matmul_one_dtype(space, method, path):
    net, arch, weight_step, x, y = _setup(space, method)
    audit = StepAudit()
    with (cpu_kernels.disabled() if path == "device-agnostic" else torch.enable_grad()), audit:
        for bilevel in (True, False):
            optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=weight_step,
                                   autocast=torch.bfloat16, check_finite=False)
    assert audit.mixed == []
    assert audit.calls["convolution"] > 0 and audit.calls["convolution_backward"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("space,bilevel,graphs", [("nas-bench-201", True, 2), ("darts", False, 1)])
def test_compiled_supernet_compiles_once_over_20_steps(space, bilevel, graphs):
    """The forward's control flow does not depend on the weights' values: as GAEA moves them,
    dynamo compiles the forward once per kind of pass (bilevel: the architecture pass and the
    weight pass) and never again. Dynamo's guards do not depend on the backend: "eager"
    keeps the test quick."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net, arch, weight_step, x, y = _setup(space, "gaea", compile="eager")
    before = [p.detach().clone() for p in net.arch_parameters()]
    for step in range(20):
        arch.set_progress(step / 20)
        optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=weight_step, check_finite=False)
        if step == 0:
            first = dict(counters["stats"])
    assert first["unique_graphs"] == graphs
    assert counters["stats"]["unique_graphs"] == graphs and "recompiles" not in counters
    assert any(not torch.equal(a, b) for a, b in zip(before, net.arch_parameters()))   # the weights did move


@pytest.mark.parametrize("bilevel", [True, False], ids=["bilevel", "single_level"])
@pytest.mark.parametrize("space", ["darts", "nas-bench-201"])
def test_cuda_path_keeps_no_more_for_backward_than_the_cpu_path(space, bilevel):
    """Bytes autograd saves over a GAEA step (parameters left out): the device-agnostic path
    on the meta device against the CPU path with its kernel tricks."""
    saved = {}
    for device in ("meta", "cpu"):
        net, arch, weight_step, x, y = _setup(space, "gaea", device)
        with SavedBytes(exclude=list(net.parameters())) as s:
            optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=weight_step, check_finite=False)
        saved[device] = s.bytes
    assert 0 < saved["meta"] <= saved["cpu"], saved


def test_compiled_retraining_network_does_not_recompile_as_drop_path_ramps():
    """The drop-path probability changes every epoch; its value lives in a buffer, so the
    compiled forward (and its backward) stay one graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = search_spaces.create_network(search_spaces.parse_genotype("DARTS_V2"), C=4, layers=3, num_classes=10,
                                       auxiliary=False)
    net.drop_path_enabled = True
    net.compile(backend="eager")
    x = torch.randn(2, 3, 16, 16)
    outs = []
    for epoch in range(5):
        net.drop_path_prob = 0.2 * epoch / 4
        out = net(x)[0]
        out.sum().backward()
        outs.append(out.detach())
    assert counters["stats"]["unique_graphs"] == 1 and "recompiles" not in counters
    net.eval()
    assert torch.equal(net(x)[0], net(x)[0])       # no drop path outside training
