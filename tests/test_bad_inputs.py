"""Every bad input is one line: exit 2, a single ``error:`` line on stderr naming the input and
the fix, no traceback, nothing written under --output. The cases run in-process through the
same ``main`` the command lines call (a few through a real subprocess at the end)."""
import json
import os
import shutil

import numpy as np
import pytest

import model_def
from nas_trial.runner import main as run_main
from search_spaces.__main__ import main as describe_main
from tests.helpers import checkpoints, run_model_def, write_config

SEARCH = {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1},
          "optimizer": "gaea", "epochs": 2, "learning_rate": 0.05, "seed": 0}
RETRAIN = {"genotype": "NB201_RESNET", "global_batch_size": 16, "init_channels": 4, "layers": 1, "epochs": 2}
DIGITS = {"dataset": "digits", "subset": 400}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A search config, a retraining config, a finished 3-batch search (its run directory
    and checkpoint), and broken copies of that checkpoint."""
    tmp = tmp_path_factory.mktemp("inputs")
    search = write_config(tmp / "search.yaml", SEARCH, DIGITS)
    retrain = write_config(tmp / "retrain.yaml", RETRAIN, DIGITS)
    proc = run_model_def(str(search), "--max-batches", "3", "--output", str(tmp / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ck = checkpoints(tmp / "run")[3]
    broken = {}
    for name, change in {"zero": lambda p: p.write_bytes(b""),
                         "truncated": lambda p: p.write_bytes(p.read_bytes()[:1000]),
                         "incomplete": None, "old": None}.items():
        d = tmp / "broken" / name / "determined" / ck.name
        shutil.copytree(ck, d)
        if change is not None:
            change(d / "state_dict.pth")
        elif name == "incomplete":
            (d / "progress.json").unlink()
        broken[name] = d
    # an older checkpoint: progress.json without the settings (then parameter shapes are compared)
    old = broken["old"]
    (old / "progress.json").write_text(json.dumps({"batches_trained": 3}))
    (tmp / "a_file").write_text("x")
    (tmp / "not_yaml.yaml").write_text("a: [1, 2\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "no_hp.yaml").write_text("name: x\n")
    (tmp / "data5.yaml").write_text("hyperparameters: {optimizer: gaea}\ndata: 5\n")
    one_class = tmp / "one_class" / "train" / "cat"
    one_class.mkdir(parents=True)
    from PIL import Image
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), i * 10, dtype=np.uint8)).save(one_class / f"{i}.jpg")
    (tmp / "empty_folder").mkdir()
    (tmp / "bad_genotype.json").write_text("{\"space\": \"darts\"}")
    return {"tmp": tmp, "search": search, "retrain": retrain, "run": tmp / "run", "ckpt": ck, **broken}


# (name, command line with {placeholders}, text the error line must contain)
CASES = [
    # experiment configs
    ("config missing", "{tmp}/nope.yaml", "does not exist"),
    ("config not YAML", "{tmp}/not_yaml.yaml", "is not valid YAML"),
    ("config a list", "{tmp}/list.yaml", "needs a 'hyperparameters' mapping"),
    ("config without hyperparameters", "{tmp}/no_hp.yaml", "needs a 'hyperparameters' mapping"),
    ("data section not a mapping", "{tmp}/data5.yaml", "data section"),
    ("config a directory", "{tmp}", "is a directory; give an experiment YAML file"),
    ("config of another format", "{ckpt}/state_dict.pth", "is not a text file; give an experiment YAML file"),
    # command-line flags
    ("max-batches 0", "{search} --max-batches 0", "--max-batches: expected a whole number >= 1, got 0"),
    ("max-batches negative", "{search} --max-batches -3", "--max-batches"),
    ("max-batches not a number", "{search} --max-batches abc", "got 'abc'"),
    ("validate-every 0", "{search} --validate-every 0", "--validate-every"),
    ("checkpoint-every text", "{search} --checkpoint-every x", "--checkpoint-every"),
    ("unknown flag", "{search} --fast", "unrecognized arguments: --fast"),
    ("--set without =", "{search} --set optimizer", "--set expects key=value"),
    ("--set empty key", "{search} --set =3", "--set expects key=value"),
    ("--output is a file", "{search} --output {tmp}/a_file", "is a file"),
    ("--output below a file", "{search} --output {tmp}/a_file/run", "a_file is a file, so no directory can be created"),
    ("--output unwritable", "{search} --output /sys/nas-test-output", "give a directory you can write"),
    # search hyperparameters
    ("unknown optimizer", "{search} --set optimizer=gea", "unknown architecture optimizer 'gea'; valid optimizers"),
    ("unknown space", "{search} --set space=nasbench", "unknown search space 'nasbench'"),
    ("misspelt hyperparameter", "{search} --set learnin_rate=0.1", "unknown setting(s) 'learnin_rate'"),
    ("learning rate text", "{search} --set learning_rate=fast", "learning_rate' must be a number"),
    ("learning rate unbalanced", "{search} --set learning_rate=[0.1", "learning_rate' must be a number"),
    ("learning rate negative", "{search} --set learning_rate=-1", "learning_rate must be > 0"),
    ("batch size 0", "{search} --set global_batch_size=0", "global_batch_size"),
    ("batch size fractional", "{search} --set global_batch_size=1.5", "global_batch_size' must be an integer"),
    ("batch larger than the data", "{search} --set global_batch_size=4096", "cannot fill one global batch"),
    ("epochs 0", "{search} --set epochs=0", "epochs"),
    ("unknown space_args", "{search} --set space_args.width=3", "unknown space_args 'width'"),
    ("negative channels", "{search} --set space_args.C=-4", "space_args {'C': -4, 'layers': 1}: C and layers"),
    ("zero layers", "{search} --set space_args.layers=0", "space_args {'C': 4, 'layers': 0}: C and layers"),
    ("darts supernet of 2 cells", "{search} --set space=darts --set space_args={{}} --set space_args.layers=2",
     "layers must be >= 3"),
    ("unknown optimizer_args", "{search} --set optimizer_args.gaea.lrr=0.1", "unknown setting(s) 'lrr'"),
    ("negative arch lr", "{search} --set optimizer_args.gaea.lr=-1", "gaea: lr and edge_lr must be >= 0"),
    ("unknown precision", "{search} --set precision=fp8", "unknown precision 'fp8'"),
    ("warm-up too long", "{search} --set arch_warmup_epochs=5", "arch_warmup_epochs must be in [0, epochs)"),
    ("schedule shorter than the run", "{search} --set schedule_epochs=1 --set epochs=3",
     "schedule_epochs must be >= epochs (3) or null, got 1"),
    ("bilevel not boolean", "{search} --set bilevel=maybe", "bilevel' must be true or false"),
    ("unknown range type", "{search} --set learning_rate={{\"type\":\"foo\"}}", "unknown type 'foo'"),
    # data
    ("unknown dataset", "{search} --set data.dataset=mnist", "mnist"),
    ("missing image folder", "{search} --set data.dataset=image_folder --set data.root={tmp}/none",
     "image folder dataset expected"),
    ("one-class image folder", "{search} --set data.dataset=image_folder --set data.root={tmp}/one_class "
                               "--set data.subset=null", "1 class"),
    ("empty image folder", "{search} --set data.dataset=image_folder --set data.root={tmp}/empty_folder "
                           "--set data.subset=null", "empty_folder"),
    ("subset 1", "{search} --set data.subset=1", "data.subset must be >= 2"),
    ("fraction above 1", "{search} --set data.train_fraction=1.5", "data.train_fraction"),
    ("negative workers", "{search} --set data.num_workers=-1", "data.num_workers must be >= 0"),
    ("unknown data key", "{search} --set data.sbuset=10", "unknown setting(s) 'sbuset' for the data section"),
    # genotypes and retraining settings
    ("unknown genotype", "{retrain} --set genotype=NOPE", "cannot read genotype 'NOPE'"),
    ("malformed arch string", "{retrain} --set genotype=|nor_conv_3x3~0|+|bad|", "malformed NAS-Bench-201 arch string"),
    ("missing genotype.json", "{retrain} --set genotype={tmp}/missing.json", "genotype"),
    ("genotype.json without cells", "{retrain} --set genotype={tmp}/bad_genotype.json", "genotype"),
    ("genotype of the other space", "{retrain} --set space=nas-bench-201 --set genotype=DARTS_V2", "nas-bench-201"),
    ("retraining width 0", "{retrain} --set init_channels=0", "init_channels and layers must be >= 1"),
    ("drop path 1.5", "{retrain} --set drop_path_prob=1.5", "drop_path_prob must be in [0, 1)"),
    ("unknown variant", "{retrain} --set space=darts --set genotype=DARTS_V2 --set variant=foo", "unknown variant"),
    ("auxiliary head on 8x8 images", "{retrain} --set space=darts --set genotype=DARTS_V2 --set layers=3",
     "set auxiliary: false"),
    # checkpoints
    ("resume missing", "{search} --resume {tmp}/none", "no such file or directory"),
    ("resume a file", "{search} --resume {tmp}/a_file", "is a file"),
    ("resume a folder without checkpoints", "{search} --resume {tmp}/one_class", "holds no complete checkpoint"),
    ("resume an incomplete checkpoint", "{search} --resume {incomplete}", "an incomplete checkpoint"),
    ("resume a zero-byte state_dict.pth", "{search} --resume {zero}", "state_dict.pth cannot be read"),
    ("resume a truncated state_dict.pth", "{search} --resume {truncated}", "state_dict.pth cannot be read"),
    ("resume with other channels", "{search} --resume {run} --set space_args.C=8",
     "written with space_args.C=4, this run has space_args.C=8"),
    ("resume with another batch size", "{search} --resume {run} --set global_batch_size=32",
     "written with global_batch_size=16, this run has global_batch_size=32"),
    ("resume with another optimizer", "{search} --resume {run} --set optimizer=darts",
     "written with optimizer='gaea', this run has optimizer='darts'"),
    ("resume a search as a retraining", "{retrain} --resume {run}", "the checkpoint was written with"),
    ("resume with fewer batches", "{search} --resume {run} --max-batches 2", "already trained 3 batches"),
    ("resume an old checkpoint at another width", "{search} --resume {old} --set space_args.C=8",
     "in the checkpoint but shape"),
]


def _argv(template: str, files) -> list[str]:
    return template.format(**{k: str(v) for k, v in files.items()}).split()


@pytest.mark.parametrize("name,template,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(name, template, expected, files, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", os.environ.get("XDG_DATA_HOME", str(tmp_path / "xdg")))
    output = tmp_path / "out"
    argv = _argv(template, files)
    if "--output" not in argv:
        argv += ["--output", str(output)]
    before = sorted(p.name for p in files["run"].rglob("*"))
    try:
        code = run_main(argv, model_def.trial_class)
    except SystemExit as e:           # argparse's exit
        code = e.code
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not output.exists()                                          # nothing written
    assert sorted(p.name for p in files["run"].rglob("*")) == before    # the resumed run untouched


DESCRIBE = [
    ("describe negative channels", "DARTS_V2 --init-channels -4", "--init-channels must be >= 1, got -4"),
    ("describe zero layers", "DARTS_V2 --layers 0", "--layers must be >= 1, got 0"),
    ("describe layers text", "DARTS_V2 --layers abc", "invalid int value: 'abc'"),
    ("describe unknown genotype", "NOPE", "cannot read genotype 'NOPE'"),
    ("describe unknown space", "DARTS_V2 --space nb", "invalid choice: 'nb'"),
    ("describe plot suffix", "DARTS_V2 --plot cell.jpg", "must end in .png or .svg"),
]


@pytest.mark.parametrize("name,args,expected", DESCRIBE, ids=[c[0] for c in DESCRIBE])
def test_describe_bad_input_is_one_line(name, args, expected, capfd):
    try:
        code = describe_main(["describe", *args.split()])
    except SystemExit as e:
        code = e.code
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


def test_table_size():
    assert len(CASES) + len(DESCRIBE) >= 40


@pytest.mark.slow
def test_bad_inputs_as_a_user_runs_them(files, tmp_path):
    """Through real processes: the exit code and stderr a shell sees."""
    for template, expected in [("{search} --set genotype_x=|nor_conv_3x3~0|+|", "unknown setting(s) 'genotype_x'"),
                               ("{search} --resume {truncated}", "state_dict.pth cannot be read")]:
        proc = run_model_def(*_argv(template, files), "--output", str(tmp_path / "o"))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
        assert not (tmp_path / "o").exists()


def test_resume_on_another_number_of_processes_is_refused(files):
    """The run's slot count is one of the settings a checkpoint records (checked as the
    command-line cases above are, here without starting two processes)."""
    from nas_trial.state import CheckpointError, check_compatible, read_progress

    progress = read_progress(files["ckpt"])
    assert progress["settings"]["slots"] == 1
    check_compatible(progress, dict(progress["settings"]), files["ckpt"])
    with pytest.raises(CheckpointError, match="written with slots=1, this run has slots=2"):
        check_compatible(progress, {**progress["settings"], "slots": 2}, files["ckpt"])
