"""The benchmark's own accuracy of a NAS-Bench-201 cell, read from the files a user has.

Three kinds of file, told apart by what they are:

* NATS-Bench topology, fast mode: the ``NATS-tss-v1_0-3ffb9-simple`` directory (``meta.pickle.pbz2``
  and one ``<index>.pickle.pbz2`` per cell) or its ``.tar`` archive (unpacked once into the
  cache), read through the ``nats_bench`` package, one cell's file per look-up;
* NAS-Bench-201 ``.pth`` (``NAS-Bench-201-v1_1-096897.pth``), read through ``nas_201_api``.
  That API loads the whole file (gigabytes), so a child process reads it once and keeps a table
  of the chosen dataset and epochs (about a megabyte, in the cache); the trial reads the table;
* a CSV exported by the user: an ``arch`` column, ``test_accuracy`` and optionally
  ``valid_accuracy``, and optionally ``dataset`` and ``epochs`` columns that select rows.

Accuracies are in percent, as the benchmarks give them. ``test_accuracy`` is the benchmark's
test split after training ``epochs`` epochs (CIFAR-10: trained on train+valid, ``ori-test``;
CIFAR-100 and ImageNet16-120: ``x-test``); ``valid_accuracy`` its validation split
(CIFAR-10: ``x-valid`` of ``cifar10-valid``; the others: ``x-valid``), averaged over the
benchmark's seeds, as the GAEA paper and AutoDL report them.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

DATASETS = ("cifar10", "cifar100", "ImageNet16-120")
EPOCHS = (12, 200)
FORMATS = ("nats", "nas-bench-201", "csv")
PACKAGES = {"nats": ("nats_bench", "nats_bench"), "nas-bench-201": ("nas_201_api", "nas-bench-201")}  # import, pip


class BenchmarkError(ValueError):
    """A benchmark file or setting that cannot be used; one line saying what to do."""


@dataclass(frozen=True)
class BenchmarkSettings:
    """``benchmark: {file, dataset, epochs}`` of a NAS-Bench-201 search."""
    file: str
    dataset: str = "cifar10"
    epochs: int = 200

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise BenchmarkError(f"benchmark.dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.epochs not in EPOCHS:
            raise BenchmarkError(f"benchmark.epochs must be 12 or 200 (the benchmark's two schedules), got "
                                 f"{self.epochs!r}")


@dataclass(frozen=True)
class Score:
    arch: str
    test_accuracy: float
    valid_accuracy: Optional[float]

    def metrics(self) -> dict[str, float]:
        out = {"benchmark_test_accuracy": self.test_accuracy}
        if self.valid_accuracy is not None:
            out["benchmark_valid_accuracy"] = self.valid_accuracy
        return out


def default_cache() -> Path:
    """Where extracted tables and unpacked archives go (the data cache's folder)."""
    return Path(os.environ.get("NAS_DATA_CACHE", "~/.cache/gaea-nas")).expanduser() / "benchmarks"


def detect(path: Path) -> str:
    """The kind of benchmark file at ``path``, or a one-line error."""
    if not path.exists():
        raise BenchmarkError(f"benchmark file {path} does not exist; give a NATS-Bench topology -simple directory "
                             "(or its .tar), a NAS-Bench-201 .pth or a CSV")
    if path.is_dir():
        if (path / "meta.pickle.pbz2").is_file():
            return "nats"
        raise BenchmarkError(f"benchmark directory {path} has no meta.pickle.pbz2: it is not a NATS-Bench "
                             "topology -simple directory (NATS-tss-v1_0-3ffb9-simple)")
    name = path.name.lower()
    if name.endswith(".tar"):
        return "nats"
    if name.endswith(".pth"):
        return "nas-bench-201"
    if name.endswith(".csv"):
        return "csv"
    raise BenchmarkError(f"benchmark file {path} is not one this project reads: a NATS-Bench topology -simple "
                         "directory or .tar, a NAS-Bench-201 .pth, or a .csv")


def _require(kind: str) -> Any:
    module, pip = PACKAGES[kind]
    try:
        return __import__(module)
    except ImportError:
        raise BenchmarkError(f"reading a {kind} benchmark file needs the {pip} package: pip install {pip} (on a "
                             "cluster the startup hook installs it when a search names a benchmark)") from None


class Benchmark:
    """Scores of cells from one benchmark file for one dataset and schedule; opened lazily."""

    def __init__(self, settings: BenchmarkSettings, cache: Optional[Path] = None):
        self.settings = settings
        path = Path(settings.file).expanduser()
        # relative to the project root, where every run starts (as data.root)
        self.path = (path if path.is_absolute() else Path(__file__).resolve().parents[1] / path).resolve()
        self.kind = detect(self.path)
        self.cache = cache or default_cache()
        self._api: Any = None
        self._table: Optional[dict[str, tuple[Optional[float], float]]] = None

    # -- opening ---------------------------------------------------------------------------
    def open(self) -> "Benchmark":
        """Read what a look-up needs (NATS: the cell list; .pth: the table; CSV: the rows)."""
        if self._api is not None or self._table is not None:
            return self
        if self.kind == "nats":
            self._api = self._open_nats()
        elif self.kind == "nas-bench-201":
            self._table = self._pth_table()
        else:
            self._table = self._csv_table()
        return self

    def _open_nats(self) -> Any:
        nats_bench = _require("nats")
        directory = self.path
        if directory.is_file():                     # the -simple archive: unpacked once
            directory = self._unpacked()
        try:
            return nats_bench.create(str(directory), "tss", fast_mode=True, verbose=False)
        except Exception as e:
            raise BenchmarkError(f"benchmark {self.path} cannot be read as NATS-Bench topology "
                                 f"({type(e).__name__}: {_first_line(e)})") from None

    def _unpacked(self) -> Path:
        target = self.cache / f"{self.path.stem}-{_stamp(self.path)}"
        if not (target / ".complete").exists():
            try:
                with tarfile.open(self.path) as tar:
                    tar.extractall(target, filter="data")
            except (tarfile.TarError, OSError) as e:
                raise BenchmarkError(f"benchmark archive {self.path} cannot be unpacked ({_first_line(e)})") from None
            (target / ".complete").write_text("")
        found = [p.parent for p in target.rglob("meta.pickle.pbz2")]
        if len(found) != 1:
            raise BenchmarkError(f"benchmark archive {self.path} holds no NATS-Bench topology -simple directory "
                                 "(no meta.pickle.pbz2)")
        return found[0]

    def _pth_table(self) -> dict[str, tuple[Optional[float], float]]:
        s = self.settings
        out = self.cache / f"{self.path.stem}-{_stamp(self.path)}-{s.dataset}-{s.epochs}.json"
        if not out.exists():
            _require("nas-bench-201")
            out.parent.mkdir(parents=True, exist_ok=True)
            code = ("import sys; from search_spaces.nb201_benchmark import extract_pth; "
                    "extract_pth(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                               os.environ.get("PYTHONPATH", "")]),
                   "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
            proc = subprocess.run([sys.executable, "-c", code, str(self.path), s.dataset, str(s.epochs), str(out)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                raise BenchmarkError(f"benchmark {self.path} cannot be read as NAS-Bench-201 ({last[:200]})")
        return {k: (v[0], v[1]) for k, v in json.loads(out.read_text()).items()}

    def _csv_table(self) -> dict[str, tuple[Optional[float], float]]:
        s = self.settings
        try:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise BenchmarkError(f"benchmark CSV {self.path} cannot be read ({_first_line(e)})") from None
        columns = set(rows[0]) if rows else set()
        if not {"arch", "test_accuracy"} <= columns:
            raise BenchmarkError(f"benchmark CSV {self.path} needs 'arch' and 'test_accuracy' columns (optionally "
                                 f"valid_accuracy, dataset, epochs); it has {', '.join(sorted(columns)) or 'none'}")
        table = {}
        for row in rows:
            if "dataset" in columns and row["dataset"] != s.dataset:
                continue
            if "epochs" in columns and row["epochs"] not in (str(s.epochs), ""):
                continue
            try:
                valid = float(row["valid_accuracy"]) if row.get("valid_accuracy") not in (None, "") else None
                table[row["arch"]] = (valid, float(row["test_accuracy"]))
            except ValueError:
                raise BenchmarkError(f"benchmark CSV {self.path}: row of {row['arch']!r} has an accuracy that is not "
                                     "a number") from None
        if not table:
            raise BenchmarkError(f"benchmark CSV {self.path} has no row for dataset {s.dataset} and {s.epochs} epochs")
        return table

    # -- look-ups --------------------------------------------------------------------------
    def score(self, arch: str) -> Score:
        """The benchmark's accuracies of the cell ``arch`` (an arch string)."""
        self.open()
        if self._table is not None:
            if arch not in self._table:
                raise BenchmarkError(f"benchmark {self.path} holds no cell {arch} for {self.settings.dataset}, "
                                     f"{self.settings.epochs} epochs")
            valid, test = self._table[arch]
            return Score(arch, test, valid)
        return self._nats_score(arch)

    def _nats_score(self, arch: str) -> Score:
        api, s = self._api, self.settings
        index = api.query_index_by_arch(arch)
        if index < 0:
            raise BenchmarkError(f"benchmark {self.path} holds no cell {arch}")
        try:
            test, valid = _test_and_valid(api, index, s.dataset, s.epochs)
        except Exception as e:
            raise BenchmarkError(f"benchmark {self.path} has no {s.dataset} results after {s.epochs} epochs for cell "
                                 f"{arch} ({type(e).__name__}: {_first_line(e)})") from None
        finally:
            api.arch2infos_dict.pop(index, None)      # one cell's file at a time in memory
        return Score(arch, test, valid)


def _test_and_valid(api: Any, index: int, dataset: str, epochs: int) -> tuple[float, Optional[float]]:
    """The benchmark API's test and validation accuracy (mean over its seeds)."""
    info = api.get_more_info(index, dataset, hp=str(epochs), is_random=False)
    if dataset == "cifar10":
        valid = api.get_more_info(index, "cifar10-valid", hp=str(epochs), is_random=False).get("valid-accuracy")
    else:
        valid = info.get("valid-accuracy")
    return float(info["test-accuracy"]), (float(valid) if valid is not None else None)


def extract_pth(path: str, dataset: str, epochs: int, out: str) -> None:
    """(Child process) every cell's accuracies from a NAS-Bench-201 .pth, as a JSON table."""
    from nas_201_api import NASBench201API

    api = NASBench201API(path, verbose=False)
    table = {}
    for index in sorted(api.arch2infos_dict):
        test, valid = _test_and_valid(api, index, dataset, epochs)
        table[api.meta_archs[index]] = [valid, test]
    tmp = Path(out + ".tmp")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, out)


def _stamp(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def settings_from(value: Any) -> Optional[BenchmarkSettings]:
    """The ``benchmark`` hyperparameter (None, or a mapping with ``file``) as settings."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or "file" not in value:
        raise BenchmarkError("benchmark must be a mapping with 'file' (and optionally 'dataset', 'epochs'), e.g. "
                             "{file: NATS-tss-v1_0-3ffb9-simple, dataset: cifar10, epochs: 200}")
    unknown = sorted(set(value) - {"file", "dataset", "epochs"})
    if unknown:
        raise BenchmarkError(f"unknown benchmark setting(s) {', '.join(map(repr, unknown))}; valid: file, dataset, "
                             "epochs")
    epochs = value.get("epochs", 200)
    if isinstance(epochs, float) and epochs.is_integer():
        epochs = int(epochs)
    return BenchmarkSettings(**{**value, "epochs": epochs})
