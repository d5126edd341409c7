"""What a cluster does that a local run's happy path does not, through Determined's own
controller with its cluster-facing APIs recorded or faked (tests/cluster_entry.py): a
diverging run on two processes leaves together and reports INVALID_HP once; a trial the
master marks stopping (an ASHA stop, which Determined 0.38.1 never signals) stops itself."""
import contextlib
import json
import re
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nas_trial.health import first_non_finite
from tests.helpers import ROOT, checkpoints, load_state, run_model_def, write_config
from tests.test_resume import validations

ENTRY = ROOT / "tests" / "cluster_entry.py"
TINY = {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1},
        "optimizer": "gaea", "epochs": 2, "learning_rate": 0.05, "seed": 0}
DIGITS = {"dataset": "digits", "subset": 400}      # 12 batches of 16 an epoch


@pytest.mark.slow
@pytest.mark.parametrize("place,batch,said,kept", [
    # the last rank's step 3 is not finite: found at the boundary at 4, on both ranks
    ("loss", 3, r"the training loss, .* is not finite at step 3, so no checkpoint after step 2 was written", [2]),
    # every loss finite, a weight NaN after step 6: the scan before the checkpoint at 6 finds it
    ("weight", 6, r"models_state_dict\[0\]\.\S+ is not finite at step 6; no checkpoint holding it was written",
     [2, 4]),
    # the chief's combined validation loss at 4, before the chief reports it
    ("val_loss", 4, r"the validation loss is nan at step 4", [2]),
])
def test_a_diverging_run_on_two_processes_leaves_together(tmp_path, place, batch, said, kept):
    record, out = tmp_path / "record.jsonl", tmp_path / "o"
    cfg = write_config(tmp_path / "exp.yaml", TINY, DIGITS)
    proc = run_model_def(str(cfg), "--max-batches", "12", "--validate-every", "4", "--checkpoint-every", "2",
                         "--output", str(out), nproc=2, script=ENTRY, rank_prefix=True, timeout=180,
                         env={"NAS_FAULT_NAN": f"{place}@{batch}", "NAS_TEST_RECORD": str(record)})
    ended = time.time()
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("rank0: error: the run diverged: "), errors
    assert re.search(said, errors[0]) and "lower learning_rate (now 0.05)" in errors[0], errors[0]
    # no traceback from a rank (torchrun itself prints one for any rank that exits non-zero,
    # as these do locally; on a cluster they exit 0)
    assert not [line for line in text.splitlines() if line.startswith("rank") and "Traceback" in line]
    assert not re.search(r'File ".*(model_def|nas_trial|search_spaces|optimizers|cluster_entry)', text)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(c["rank"], c["reason"]) for c in calls] == [(0, "EXITED_REASON_INVALID_HP")]
    assert ended - calls[0]["time"] < 30                   # both processes gone soon after
    assert sorted(checkpoints(out)) == kept
    assert len(list((out / "determined").iterdir())) == len(kept)       # nothing half-written
    for ck in checkpoints(out).values():
        assert first_non_finite({k: v for k, v in load_state(ck).items() if k != "rng_state"}) is None


class _FakeMaster:
    """Answers ``GET /api/v1/trials/<id>`` with the next of ``states`` (the last one repeats),
    or with HTTP 500 when ``states`` is None."""

    def __init__(self, states):
        self.states, self.paths = states, []

    @contextlib.contextmanager
    def serving(self):
        master = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                master.paths.append(self.path)
                if master.states is None:
                    self.send_response(500)
                    body = b'{"error": {"error": "the master is down"}}'
                else:
                    state = master.states[min(len(master.paths), len(master.states)) - 1]
                    self.send_response(200)
                    body = json.dumps({"trial": {
                        "id": 7, "experimentId": 3, "hparams": {}, "restarts": 0, "state": state,
                        "startTime": "2026-12-07T00:00:00Z", "totalBatchesProcessed": 0}}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
            server.server_close()


def _run_asking(tmp_path, states, batches):
    master, out = _FakeMaster(states), tmp_path / "o"
    cfg = write_config(tmp_path / "exp.yaml", TINY, DIGITS)
    with master.serving() as url:
        proc = run_model_def(str(cfg), "--max-batches", str(batches), "--validate-every", "4",
                             "--checkpoint-every", "100", "--output", str(out), script=ENTRY,
                             env={"NAS_TEST_MASTER": url, "NAS_TEST_RECORD": str(tmp_path / "record.jsonl")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, master, out


@pytest.mark.slow
def test_a_trial_the_master_marks_stopping_stops_after_that_validation(tmp_path):
    """The master answers STOPPING_COMPLETED to the question after the second validation: the
    run stops right there (its checkpoint at 8 is the last), after one request per validation."""
    proc, master, out = _run_asking(tmp_path, ["STATE_RUNNING", "STATE_STOPPING_COMPLETED"], 24)
    assert master.paths == ["/api/v1/trials/7"] * 2
    assert validations(proc) == [4, 8]
    assert sorted(checkpoints(out)) == [4, 8]
    assert "marked this trial STOPPING_COMPLETED" in proc.stdout
    assert "finished at batch 8;" in proc.stdout


@pytest.mark.slow
def test_a_failed_question_is_said_once_and_the_run_goes_on(tmp_path):
    proc, master, out = _run_asking(tmp_path, None, 12)
    assert len(master.paths) == 3 and validations(proc) == [4, 8, 12]
    warnings = [line for line in proc.stderr.splitlines() if "could not ask the master" in line]
    assert len(warnings) == 1 and "APIException" in warnings[0], proc.stderr[-2000:]
    assert max(checkpoints(out)) == 12


class _Dist:
    def __init__(self, rank, size, others=None):
        self.rank, self.size, self.others = rank, size, others

    def get_rank(self):
        return self.rank

    def get_size(self):
        return self.size

    def broadcast(self, value):
        return value if self.rank == 0 else self.others

    def allgather(self, value):
        return [value, self.others] if self.rank == 0 else [self.others, value]


def test_without_a_checkpoint_after_the_validation_the_next_boundary_asks():
    """(checkpoint_policy best: most validations write no checkpoint.) The answer travels from
    the chief to the other ranks; every rank requests the stop; nobody asks twice."""
    from nas_trial.stopping import StopWhenMasterStops

    asked = []

    def master(context):
        asked.append(context.distributed.rank)
        return types.SimpleNamespace(get=lambda path, timeout: types.SimpleNamespace(json=lambda: {"trial": {
            "id": 7, "experimentId": 3, "hparams": {}, "restarts": 0, "state": "STATE_STOPPING_COMPLETED",
            "startTime": "2026-12-07T00:00:00Z", "totalBatchesProcessed": 0}})), 7

    for rank in (0, 1):
        requested = []
        context = types.SimpleNamespace(distributed=_Dist(rank, 2, others="STATE_STOPPING_COMPLETED"),
                                        set_stop_requested=requested.append)
        cb = StopWhenMasterStops(context, "retrain", master=master)
        cb.on_training_workload_end({}, [])          # no validation yet: nobody asks
        cb.on_validation_end({"val_accuracy": 0.5})
        cb.on_training_workload_end({}, [])
        cb.on_training_workload_end({}, [])
        assert requested == [True]
    assert asked == [0]                                # the chief, once


def test_every_rank_leaves_on_any_rank_finding():
    """Rank 1 finds nothing itself but rank 0 did: both leave without the exit checkpoint;
    only the chief reports the early exit."""
    import determined as det

    from nas_trial.faults import Faults
    from nas_trial.health import Health

    reports = []
    for rank in (0, 1):
        finding = (7, "the run diverged: the training loss is not finite at step 7, so no checkpoint after step 0 "
                      "was written")
        context = types.SimpleNamespace(distributed=_Dist(rank, 2, others=finding),
                                        _core=types.SimpleNamespace(train=types.SimpleNamespace(
                                            report_early_exit=lambda reason, r=rank: reports.append((r, reason)))))
        trial = types.SimpleNamespace(steps=10, context=context, faults=Faults(""),
                                      checkpoint_state=lambda: {"w": torch.ones(3)})
        health = Health(trial, "lower learning_rate")
        health.record(10, "the training loss", torch.tensor(True))
        with pytest.raises(det.pytorch._ShouldExit) as left:
            health.on_training_workload_end({}, [])
        assert left.value.skip_exit_checkpoint
        assert health.diverged.endswith("at step 7, so no checkpoint after step 0 was written; lower learning_rate")
    assert reports == [(0, det.core.EarlyExitReason.INVALID_HP)]
