"""Distributed search: identical architecture weights on every rank after every step, and
exact resume under 2-process DDP (gloo, CPU)."""

import math
import re

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
                        "optimizer": "gaea", "epochs": 2, "schedule_epochs": 4, "learning_rate": 0.05},
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
    # validation ran on both ranks and covered the held-out half once, as on one process
    held_out = [re.findall(r"val_images (\d+)", r.stdout) for r in (a, single)]
    assert held_out[0] == held_out[1] == ["200", "200"]
    assert set(checkpoints(tmp_path / "s")) == set(checkpoints(tmp_path / "a")) == {12, 16}
    for n in (12, 16):
        lr = [load_state(checkpoints(tmp_path / r)[n])["lr_schedulers_state_dict"] for r in ("a", "s")]
        assert lr[0] == lr[1]
    # the cosine runs over schedule_epochs (4) and stops part-way down after epochs (2)
    lr16 = load_state(checkpoints(tmp_path / "s")[16])["lr_schedulers_state_dict"]
    lr16 = lr16[0] if isinstance(lr16, list) else lr16
    assert lr16["T_max"] == 4
    assert lr16["_last_lr"][0] == pytest.approx(0.001 + (0.05 - 0.001) * (1 + math.cos(math.pi / 4)) / 2)


NO_FIRST_INPUT = ("Genotype(normal=[('sep_conv_3x3', 1), ('max_pool_3x3', 1), ('sep_conv_3x3', 2), ('skip_connect', 1), "
                  "('sep_conv_3x3', 3), ('skip_connect', 2), ('sep_conv_3x3', 4), ('skip_connect', 1)], "
                  "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 1), ('skip_connect', 1), ('max_pool_3x3', 2), "
                  "('skip_connect', 1), ('skip_connect', 2), ('skip_connect', 3), ('skip_connect', 2), "
                  "('skip_connect', 4)], reduce_concat=[2, 3, 4, 5])")


@pytest.mark.slow
def test_retraining_on_two_processes_with_idle_parameters(tmp_path):
    """A genotype with no edge from the cells' first input leaves each cell's preprocess0 idle,
    which DDP (find_unused_parameters=False) refuses; with the auxiliary head on, 2 processes
    train, and the idle parameters get no update (no optimizer state), as on one process."""
    from tests.helpers import load_state

    cfg = write_config(tmp_path / "exp.yaml",
                       {"genotype": NO_FIRST_INPUT, "global_batch_size": 16, "init_channels": 4, "layers": 3,
                        "epochs": 1, "auxiliary": True, "auxiliary_weight": 0.4},
                       {"dataset": "digits", "subset": 200, "image_size": 32})
    proc = run_model_def(str(cfg), "--max-batches", "2", "--output", str(tmp_path / "o"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_state(checkpoints(tmp_path / "o")[2])
    names = list(state["models_state_dict"][0])
    params = [n for n in names if "running" not in n and "num_batches" not in n]
    momentum = state["optimizers_state_dict"][0]["state"]
    idle = [i for i, n in enumerate(params) if ".preprocess0." in n]
    assert idle and all(i not in momentum for i in idle)
    assert any(".auxiliary_head." in params[i] for i in momentum)         # the head trains
