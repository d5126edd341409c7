"""model_def.py with Determined's cluster-facing APIs replaced by recording fakes, for tests.

* ``report_early_exit`` of the core context's train API appends one JSON line per call
  (rank, reason, time) to ``$NAS_TEST_RECORD``.
* With ``$NAS_TEST_MASTER`` (a fake master's URL) the trial asks it for its state through a
  real ``api.Session`` and the generated bindings, as it asks the master on a cluster, as
  trial ``$NAS_TEST_TRIAL_ID``.

Run as ``python tests/cluster_entry.py <model_def.py arguments>`` (or under torchrun)."""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _record(self, reason) -> None:
    with open(os.environ["NAS_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "reason": reason.value,
                            "time": time.time()}) + "\n")


def main() -> int:
    from determined import core
    from determined.common import api

    import model_def
    from nas_trial import runner, stopping

    core.DummyTrainContext.report_early_exit = _record
    if os.environ.get("NAS_TEST_MASTER"):
        session = api.Session(os.environ["NAS_TEST_MASTER"], username="test", token="test", cert=None,
                              max_retries=None)
        trial_id = int(os.environ.get("NAS_TEST_TRIAL_ID", "7"))
        stopping.master_trial = lambda context: (session, trial_id)
    return runner.main(sys.argv[1:], model_def.trial_class)


if __name__ == "__main__":
    sys.exit(main())
