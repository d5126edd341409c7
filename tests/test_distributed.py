"""Distributed search: identical architecture weights on every rank after every step, and
exact resume under 2-process DDP (gloo, CPU)."""

import pytest
import torch
import torch.multiprocessing as mp

from tests import ddp_worker
from tests.helpers import checkpoints, run_model_def, write_config


@pytest.mark.slow
@pytest.mark.parametrize("method,space", [("gaea", "darts"), ("darts", "nas-bench-201"), ("gdas", "nas-bench-201"),
                                          ("random", "darts")])
def test_ranks_hold_identical_weights_after_every_step(tmp_path, method, space):
    out = tmp_path / "report.pt"
    mp.spawn(ddp_worker.worker, args=(2, str(tmp_path / "init"), method, space, 4, str(out)), nprocs=2)
    report = torch.load(out)
    assert report["inputs_differ"]          # each rank trained on its own shard ...
    assert report["mismatch"] == 0          # ... and all parameters agree after every step


@pytest.mark.slow
def test_ddp_resume_mid_epoch_into_a_new_output_is_exact(tmp_path):
    """2 processes: the epoch is the single process's (200 images at 16 a step: 12 steps,
    where each rank's share, 25 batches of 8, does not split evenly); stopped at 5, resumed
    from the run directory into a new --output, the run validates at 12 as the uninterrupted
    one does and ends equal. The single-process run of the same config validates,
    checkpoints and anneals the learning rate at the same steps."""
    from tests.helpers import load_state
    from tests.test_resume import same_run_state, validations

    cfg = write_config(tmp_path / "exp.yaml",
                       {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1},
                        "optimizer": "gaea", "epochs": 2, "learning_rate": 0.05},
                       {"dataset": "digits", "subset": 400})
    a = run_model_def(str(cfg), "--max-batches", "16", "--output", str(tmp_path / "a"), nproc=2)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "8 per slot x 2 slot(s)" in a.stdout and "12 per epoch" in a.stdout
    b = run_model_def(str(cfg), "--max-batches", "5", "--output", str(tmp_path / "b"), nproc=2)
    assert b.returncode == 0, b.stderr[-3000:]
    c = run_model_def(str(cfg), "--max-batches", "16", "--output", str(tmp_path / "c"), "--resume",
                      str(tmp_path / "b"), nproc=2)
    assert c.returncode == 0, c.stderr[-3000:]
    assert validations(a) == [12, 16] and validations(c) == [12, 16]
    for n in (12, 16):
        same_run_state(checkpoints(tmp_path / "a")[n], checkpoints(tmp_path / "c")[n])
    single = run_model_def(str(cfg), "--max-batches", "16", "--output", str(tmp_path / "s"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "12 per epoch" in single.stdout and validations(single) == [12, 16]
    assert set(checkpoints(tmp_path / "s")) == set(checkpoints(tmp_path / "a")) == {12, 16}
    for n in (12, 16):
        lr = [load_state(checkpoints(tmp_path / r)[n])["lr_schedulers_state_dict"] for r in ("a", "s")]
        assert lr[0] == lr[1]
