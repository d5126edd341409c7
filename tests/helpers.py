import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_model_def(*args: str, nproc: int = 1, timeout: int = 300, env: dict | None = None,
                  script: Path = ROOT / "model_def.py", rank_prefix: bool = False) -> subprocess.CompletedProcess:
    """Run model_def.py (or a test entry that wraps it) as a user would (torchrun for nproc > 1;
    ``rank_prefix``: every output line starts with ``rank<N>: ``)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000),
               *(["--tee", "3", "--log-line-prefix-template", "rank${rank}: "] if rank_prefix else []),
               str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_in_process(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """model_def.py's ``main`` in this process, without the ~4 s of imports a new process pays:
    its exit code and what it printed. ``main`` changes the working directory and
    XDG_DATA_HOME; both are restored."""
    import contextlib
    import io

    import pytest

    import model_def
    from nas_trial.runner import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("XDG_DATA_HOME", str(Path(cwd) / "xdg"))
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args), model_def.trial_class)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def checkpoints(output: Path) -> dict[int, Path]:
    """Checkpoint directories under a run's --output, by batches trained."""
    out = {}
    for d in (output / "determined").iterdir():
        if (d / "progress.json").exists():
            out[json.loads((d / "progress.json").read_text())["batches_trained"]] = d
    return out


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state_dict.pth", weights_only=False)


def write_config(path: Path, hparams: dict, data: dict, **extra) -> Path:
    import yaml

    config = {"name": "test", "entrypoint": "python3 -m determined.launch.torch_distributed python3 model_def.py",
              "searcher": {"name": "single", "metric": "val_accuracy", "smaller_is_better": False},
              "data": data, "hyperparameters": hparams, **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def straight_and_resumed(config: Path, cut: int, total: int, cwd: Path, *args: str) -> tuple[Path, Path]:
    """Run ``config`` for ``total`` batches into ``cwd/a``, and for ``cut`` then resumed to
    ``total`` into ``cwd/b`` (in this process); both runs' output directories."""
    a, b = cwd / "a", cwd / "b"
    for out, more in ((a, ["--max-batches", str(total)]), (b, ["--max-batches", str(cut)]),
                      (b, ["--max-batches", str(total), "--resume", str(b)])):
        proc = run_in_process(str(config), *more, "--output", str(out), *args, cwd=cwd)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return a, b
