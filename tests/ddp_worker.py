"""Worker for the 2-process gloo test: a plain-PyTorch DDP search (no Determined) that checks,
after every step, that all ranks hold identical architecture (and weight) parameters."""
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def worker(rank: int, world: int, init_file: str, method: str, space: str, steps: int, out: str) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    import optimizers
    import search_spaces

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    kw = dict(C=8, layers=3, partial_channels=2, edge_normalization=True) if space == "darts" else dict(C=4, layers=1)
    net = search_spaces.create(space, **kw)
    names = [n for n, _ in net.arch_named_parameters()]
    DDP._set_params_and_buffers_to_ignore_for_model(net, names + ["." + n for n in names if "." not in n])
    model = DDP(net)
    arch = optimizers.create(method, net, seed=3)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9)

    def weight_step():
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    report = {"mismatch": 0, "inputs_differ": True}
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own shard
        x, xv = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
        y, yv = torch.randint(0, 10, (4,), generator=g), torch.randint(0, 10, (4,), generator=g)
        gathered = [torch.zeros_like(x) for _ in range(world)]
        dist.all_gather(gathered, x)
        report["inputs_differ"] &= not torch.equal(gathered[0], gathered[1])
        arch.set_progress(step / steps)
        optimizers.search_step(model, arch, x, y, xv, yv, weight_step=weight_step, ddp_unused=arch.sampled)
        for p in list(net.arch_parameters()) + list(net.weight_parameters()):
            others = [torch.zeros_like(p) for _ in range(world)]
            dist.all_gather(others, p.detach().contiguous())
            report["mismatch"] += sum(not torch.equal(others[0], o) for o in others[1:])
    if rank == 0:
        torch.save(report, out)
    dist.destroy_process_group()


def validation_worker(rank: int, world: int, init_file: str, n: int, batch: int, out: str) -> None:
    """Each rank measures its shard of a held-out set with the trial's functions; rank 0
    combines them (the chief's step) and saves the result."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from nas_data import ShardBatchSampler
    from nas_trial.validation import combine, evaluate_batches

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net, weights, data = validation_fixture(n)
    sampler = ShardBatchSampler(n, batch, rank, world)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    mine = evaluate_batches(lambda x: net(x, weights), loader, sampler.batch_ids(), lambda b: b)
    shards = [None] * world
    dist.all_gather_object(shards, mine)
    if rank == 0:
        torch.save({"result": combine(shards), "batches_per_rank": [len(s) for s in shards]}, out)
    dist.destroy_process_group()


def validation_fixture(n: int):
    """A seeded NAS-Bench-201 supernet in eval mode with non-uniform architecture weights, and
    ``n`` random labelled images."""
    import optimizers
    import search_spaces

    torch.manual_seed(0)
    net = search_spaces.create("nas-bench-201", C=4, layers=1).eval()
    arch = optimizers.create("gaea", net, seed=3)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.softmax(torch.randn(p.shape), -1))
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    return net, arch.probabilities(), data
