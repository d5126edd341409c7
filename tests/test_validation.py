"""Validation on every slot: each rank measures its share of the held-out batches and the
chief's sums equal one slot's exactly."""
import pytest
import torch
import torch.multiprocessing as mp

from nas_data import ShardBatchSampler
from nas_trial.validation import BatchSums, combine, evaluate_batches
from tests import ddp_worker


@pytest.mark.parametrize("n,batch,world", [(37, 8, 1), (37, 8, 2), (37, 8, 3), (40, 8, 2), (5, 8, 2), (16, 8, 4)])
def test_shards_cover_the_single_slot_batches_once(n, batch, world):
    single = list(ShardBatchSampler(n, batch))
    by_id = {}
    for rank in range(world):
        s = ShardBatchSampler(n, batch, rank, world)
        assert len(s) == len(list(s.batch_ids()))
        by_id.update(zip(s.batch_ids(), s))
    assert [by_id[i] for i in range(len(by_id))] == single
    assert sorted(i for b in single for i in b) == list(range(n))


def test_combine_refuses_missing_batches():
    with pytest.raises(RuntimeError, match="missing or repeated"):
        combine([[BatchSums(0, 1.0, 1, 2)], [BatchSums(2, 1.0, 1, 2)]])


@pytest.mark.slow
def test_two_ranks_give_the_single_slot_numbers_exactly(tmp_path):
    n, batch = 37, 8        # 5 batches, the last short: rank 0 takes 3, rank 1 takes 2
    net, weights, data = ddp_worker.validation_fixture(n)
    sampler = ShardBatchSampler(n, batch)
    single = combine([evaluate_batches(lambda x: net(x, weights), torch.utils.data.DataLoader(data, batch_sampler=sampler),
                                       sampler.batch_ids(), lambda b: b)])
    out = tmp_path / "two.pt"
    mp.spawn(ddp_worker.validation_worker, args=(2, str(tmp_path / "init"), n, batch, str(out)), nprocs=2)
    two = torch.load(out)
    assert two["batches_per_rank"] == [3, 2]
    assert two["result"] == single                 # loss and accuracy bitwise, images 37
    assert single["images"] == n and 0 < single["accuracy"] < 1
