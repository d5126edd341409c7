"""The supernets' own ops compute the same functions and gradients as the native ones, on
the CPU path (its kernel tricks) and on the device-agnostic path (CUDA's, run on the CPU)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search_spaces import cpu_kernels
from search_spaces.fused_ops import AvgPool3x3, Conv2d, DepthwiseConv2d, MaxPool3x3, depthwise_conv, scaled_batch_norm


@pytest.fixture(params=["cpu", "device-agnostic"])
def path(request):
    """Each test runs on both paths."""
    if request.param == "cpu":
        yield request.param
    else:
        with cpu_kernels.disabled():
            yield request.param


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_pools_match_native(stride, size, path):
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    for mine, ref in [(AvgPool3x3(stride), lambda t: F.avg_pool2d(t, 3, stride, 1, count_include_pad=False)),
                      (MaxPool3x3(stride), lambda t: F.max_pool2d(t, 3, stride, 1))]:
        assert torch.allclose(mine(x), ref(x))
        g = torch.randn_like(ref(x))
        assert torch.allclose(torch.autograd.grad(mine(x), x, g)[0], torch.autograd.grad(ref(x), x, g)[0])
        assert torch.autograd.gradcheck(mine, (x,))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k,d", [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_depthwise_conv_gradients_match_native(stride, k, d, path):
    p = d * (k - 1) // 2
    conv = DepthwiseConv2d(4, k, stride, p, d).double()
    ref = nn.Conv2d(4, 4, k, stride, p, d, groups=4, bias=False).double()
    ref.load_state_dict(conv.state_dict())                       # same parameters, same state dict
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(ref(x))
    mine = torch.autograd.grad(conv(x), (x, conv.weight), g)
    native = torch.autograd.grad(ref(x), (x, ref.weight), g)
    assert all(torch.allclose(a, b) for a, b in zip(mine, native))


@pytest.mark.parametrize("stride", [1, 2])
def test_repeated_depthwise_conv_matches_native_and_keeps_its_input_once(stride, path):
    """E edges reading one input: the convolution of the input repeated E times keeps the
    input itself for backward, not the repeated copy."""
    E, C = 3, 4
    x = torch.randn(2, C, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E * C, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = depthwise_conv(x, w, stride, 1, 1, repeat=E)
    ref = F.conv2d(torch.cat([x] * E, 1), w, None, stride, 1, 1, E * C)
    g = torch.randn_like(ref)
    assert torch.allclose(y, ref)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)))
    assert (2, E * C, 9, 9) not in saved and (2, C, 9, 9) in saved


def test_conv_without_weight_gradient_keeps_no_input():
    conv = Conv2d(4, 6, 3, padding=1, bias=False).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = torch.func.functional_call(conv, {"weight": w}, (x,))
    assert list(saved) == [w.shape]                          # only the weight is kept
    g = torch.randn_like(out)
    assert torch.allclose(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(F.conv2d(x, w, padding=1), x, g)[0])


def test_scaled_batch_norm_matches_bn_times_weight():
    bn_a, bn_b = nn.BatchNorm2d(5, affine=False).double(), nn.BatchNorm2d(5, affine=False).double()
    z = torch.randn(4, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = scaled_batch_norm(z, bn_a, w)
    ref = bn_b(z) * w
    assert torch.allclose(out, ref)
    g = torch.randn_like(ref)
    mine, native = torch.autograd.grad(out, (z, w), g), torch.autograd.grad(ref, (z, w), g)
    assert all(torch.allclose(a, b) for a, b in zip(mine, native))
    assert torch.equal(bn_a.running_mean, bn_b.running_mean) and torch.equal(bn_a.running_var, bn_b.running_var)
    assert bn_a.num_batches_tracked == bn_b.num_batches_tracked == 1


@pytest.mark.parametrize("k", [1, 3])
def test_scaled_conv_batch_norm_recomputes_the_convolution(k):
    from search_spaces.fused_ops import scaled_conv_batch_norm
    conv = Conv2d(4, 4, k, padding=k // 2, bias=False).double().requires_grad_(False)  # architecture step
    bn_a, bn_b = nn.BatchNorm2d(4, affine=False).double(), nn.BatchNorm2d(4, affine=False).double()
    r = torch.randn(3, 4, 6, 6, dtype=torch.float64).relu().requires_grad_()
    w = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = scaled_conv_batch_norm(r, conv, bn_a, w)
    assert not any(t.shape == out.shape and t is not r for t in saved)   # no (B, C, H, W) tensor but r
    ref = bn_b(F.conv2d(r, conv.weight, padding=k // 2)) * w
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (r, w), g), torch.autograd.grad(ref, (r, w), g)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var)


@pytest.mark.parametrize("channels", [4, 24])   # channels-last inside for few channels, NCHW otherwise
def test_conv_batch_norm_recomputes_the_1x1_convolution(channels):
    from search_spaces.fused_ops import conv_batch_norm
    conv = Conv2d(channels, 6, 1, bias=False).double()
    ref_conv = nn.Conv2d(channels, 6, 1, bias=False).double()
    ref_conv.load_state_dict(conv.state_dict())
    bn_a, bn_b = nn.BatchNorm2d(6, affine=False).double(), nn.BatchNorm2d(6, affine=False).double()
    u = torch.randn(3, channels, 5, 5, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = conv_batch_norm(u, conv, bn_a)
    assert not any(t.shape == out.shape for t in saved)          # the convolution's output is not kept
    ref = bn_b(ref_conv(u))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (u, conv.weight), g), torch.autograd.grad(ref, (u, ref_conv.weight), g)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean)


def test_max_pool_recomputes_instead_of_keeping_indices():
    pool = MaxPool3x3(1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = pool(x)
    assert len(saved) == 1 and saved[0] is x            # no int64 indices, no channels-last copy
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(F.max_pool2d(x, 3, 1, 1), x, g)[0])


@pytest.mark.parametrize("space,kw", [("darts", {"C": 8, "layers": 3, "partial_channels": 2, "edge_normalization": True}),
                                      ("nas-bench-201", {"C": 4, "layers": 1})])
def test_supernet_trains_under_bf16_autocast(space, kw):
    import optimizers
    import search_spaces
    net = optimizers.prepare_supernet(search_spaces.create(space, **kw))
    arch = optimizers.create("gaea", net)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    r = optimizers.search_step(net, arch, x, y, x, y, weight_step=lambda: (sgd.step(), sgd.zero_grad()),
                               autocast=torch.bfloat16)
    assert torch.isfinite(r.loss) and torch.isfinite(r.arch_loss)
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("E,repeat", [(1, 1), (3, 1), (3, 3)])
def test_edge_norms_match_one_norm_per_edge(layout, E, repeat):
    """E edges' norms as one kernel (z repeated for edges reading one input) against
    ``w[e] * bn_e(z_e)`` edge by edge: outputs, gradients and running statistics."""
    from search_spaces.fused_ops import edge_norms
    torch.manual_seed(0)
    C = 4
    z = torch.randn(6, C * E // repeat, 5, 5).contiguous(memory_format=layout).requires_grad_()
    w = torch.rand(E, requires_grad=True)
    bns, ref_bns = [nn.BatchNorm2d(C, affine=False) for _ in range(E)], [nn.BatchNorm2d(C, affine=False) for _ in range(E)]
    y = edge_norms(z, bns, w, repeat)
    zr = torch.cat([z] * repeat, 1)
    ref = torch.cat([w[e] * bn(zr[:, e * C:(e + 1) * C]) for e, bn in enumerate(ref_bns)], 1)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (z, w), g), torch.autograd.grad(ref, (z, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for bn, rbn in zip(bns, ref_bns):
        torch.testing.assert_close(bn.running_mean, rbn.running_mean)
        torch.testing.assert_close(bn.running_var, rbn.running_var)
        assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("space,kw", [("darts", {"C": 8, "layers": 3, "partial_channels": 2, "edge_normalization": True}),
                                      ("nas-bench-201", {"C": 8, "layers": 1})])
def test_memory_format_changes_no_gradient(space, kw):
    """The same supernet in NCHW and channels-last: the same architecture gradients
    (edge groups of one edge included)."""
    import copy

    import optimizers
    import search_spaces
    torch.manual_seed(0)
    nets = [search_spaces.create(space, **kw)]
    nets.append(copy.deepcopy(nets[0]))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    grads = []
    for net, cl in zip(nets, (False, True)):
        optimizers.prepare_supernet(net, channels_last=cl)
        F.cross_entropy(net(x), y).backward()
        grads.append([p.grad for p in net.arch_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("weight_grad", [False, True])   # architecture step / weight step
@pytest.mark.parametrize("groups", [2, 3])
def test_edge_pointwise_convolutions_match_grouped_conv(groups, weight_grad):
    """E edges' 1x1 convolutions as one grouped convolution (a batched matrix product on CPU)
    followed by their norms and op weights, against ``F.conv2d(groups=E)`` and ``w[e] * bn_e``."""
    from search_spaces.fused_ops import edge_conv1x1_norms
    torch.manual_seed(0)
    q = 4
    u = torch.randn(3, groups * q, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(groups * q, q, 1, 1, dtype=torch.float64, requires_grad=weight_grad)
    w = torch.rand(groups, dtype=torch.float64, requires_grad=not weight_grad)
    bns = [nn.BatchNorm2d(q, affine=False).double() for _ in range(groups)]
    ref_bns = [nn.BatchNorm2d(q, affine=False).double() for _ in range(groups)]
    out = edge_conv1x1_norms(u, weight, bns, w, groups)
    z = F.conv2d(u, weight, groups=groups)
    ref = torch.cat([w[e] * bn(z[:, e * q:(e + 1) * q]) for e, bn in enumerate(ref_bns)], 1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    wrt = (u, weight) if weight_grad else (u, w)
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("channels", [2, 3, 7, 16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [8, 9])
def test_strided_pointwise_conv_matches_native_in_float32(channels, layout, size):
    """FactorizedReduce's stride-2 1x1 convolutions, with and without a weight gradient, at the
    few-channel sizes whose channels-last weight gradient crashed oneDNN on an AMD EPYC."""
    torch.manual_seed(0)
    conv = Conv2d(channels, 4, 1, stride=2, bias=False)
    x = torch.randn(16, channels, size, size).contiguous(memory_format=layout).requires_grad_()
    g = torch.randn(16, 4, (size + 1) // 2, (size + 1) // 2)
    mine = torch.autograd.grad(conv(x), (x, conv.weight), g)
    xd, wd = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    native = torch.autograd.grad(F.conv2d(xd, wd, None, 2), (xd, wd), g.double())
    assert all(torch.allclose(a.double(), b, atol=1e-4) for a, b in zip(mine, native))
    conv.weight.requires_grad_(False)                            # the architecture step: input gradient only
    (grad_x,) = torch.autograd.grad(conv(x), (x,), g)
    assert torch.allclose(grad_x.double(), native[0], atol=1e-4)
