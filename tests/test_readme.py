"""Every shell command of README.md's ```bash blocks, run as a newcomer would run it.

The commands are read from the README itself, in order, and run in one fresh directory
(``PROJECT_ROOT`` and the working directory point there), so a later command finds what an
earlier one wrote (``example/`` from ``rtcnn.sim``, ``cands.ecsv`` from ``rtcnn.detect``).
Each is checked for its exit code and for the files the README says it writes.

* ``python -m rtcnn.X ARGS`` runs in this process (``runpy``, exactly what ``python -m``
  executes, with ``sys.argv`` set): one interpreter start for the whole README instead of
  one per command (~10 s each on the loaded 2-core machine). ``source .venv/bin/activate``
  is run for real in bash, and proves that ``python`` then is the environment's.
* A command that would take minutes runs with the small overrides of :data:`COMMANDS`.
* Commands meant for a GPU or a cluster, or a data set that is not here, are not run:
  :data:`COMMANDS` gives the reason, and their flags/overrides are still checked (the
  argparse parser of the command, or Hydra's composition of ``conf/``), so a renamed flag
  or config key fails here even for them.
* A README command missing from :data:`COMMANDS` fails the test (the table stays complete),
  and so does a table entry that is no longer in the README.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CONF_DIR, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent  # the environment this suite runs in

# A training run of a few seconds (added to every README training command that runs).
TRAIN_FAST = ["trainer=debug", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
              "data.num_workers=0", "data.persistent_workers=false", "data.progress=false",
              "extras.print_config=false", "callbacks.report_figures=null"]
NO_PANELS = ["model.n_panels=0"]  # the TensorBoard panels of the localisation/detection tasks
ATTN5_SMALL = ["model.net.filters=[4,4,4,4,4]", "model.net.hidden=8", *NO_PANELS]


def tiny_data(tiny_sim: Path) -> list[str]:
    """The default data (``data=sim``: 24 pairs of 1024 px) -> conftest's tiny set."""
    return [o for o in tiny_overrides(tiny_sim, Path()) if o.startswith(("data.", "+data."))]
# the README's ``pairs/`` set (3 epochs-mode pairs of 256 px, seed 2) as a training set
PAIRS_DATA = ["data.val_fraction=0.34", "data.test_fraction=0.34", "data.batch_size=4"]


@dataclass
class Spec:
    """How one README command runs here.

    kind: ``run`` (as printed, plus ``extra`` arguments / in place of ``replace``),
    ``parse`` (not run, ``reason``; its argparse parser must accept the arguments),
    ``compose`` (not run, ``reason``; Hydra must compose ``conf/`` with its overrides),
    ``elsewhere`` (not run, ``reason``; ``covered_by`` names the test that runs it).
    ``writes``: paths (globs) relative to the working directory that must exist after it.
    """

    kind: str = "run"
    extra: list[str] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)
    writes: list[str] = field(default_factory=list)
    reason: str = ""
    covered_by: str = ""
    check: str = ""  # name of an extra check below (check_<name>)


#: README command (as printed, comments stripped) -> how it runs here. The fast overrides
#: are the only difference from the README's text.
COMMANDS: dict[str, Spec] = {
    "make demo": Spec("elsewhere", reason="trains, evaluates, simulates and detects in 5 "
                      "subprocesses (~5-10 min); the test runs `make -n demo` and demo.main "
                      "with tiny overrides is tests/test_demo.py's", check="demo",
                      covered_by="tests/test_demo.py::test_demo_trains_then_evaluates_the_best_checkpoint"),
    "make test": Spec("elsewhere", reason="the test suite itself", check="make_test",
                      covered_by="tests/test_readme.py"),
    "source .venv/bin/activate": Spec(check="activate"),
    "python -m rtcnn.sim example --pairs 1 --size 512 --mode epochs --seed 1": Spec(
        extra=["--no-progress"], writes=["example/pair_0000/ref.fits",
                                         "example/pair_0000/new.fits",
                                         "example/pair_0000/truth.ecsv"]),
    "python -m rtcnn.detect example/pair_0000/ref.fits example/pair_0000/new.fits -o cands.ecsv --regions": Spec(
        extra=["--no-progress"], writes=["cands.ecsv", "cands.reg"], check="catalog"),
    "python -m rtcnn.score cands.ecsv --truth example/pair_0000/truth.ecsv": Spec(),
    "python -m rtcnn.sim rolled --pairs 1 --size 384 --mode survey --epochs 3 --seed 11": Spec(
        extra=["--no-progress"], writes=["rolled/pair_0000/ref.fits"]),
    "python -m rtcnn.detect rolled/pair_0000/ref.fits rolled/pair_0000/new.fits -o rolled.ecsv": Spec(
        extra=["--no-progress"], writes=["rolled.ecsv"], check="aligned"),
    "python -m rtcnn.detect example/pair_0000/ref.fits example/pair_0000/new.fits -o vet.ecsv --alerts alerts --cutouts": Spec(
        extra=["--no-progress"], writes=["vet.ecsv"], check="alerts"),
    "python -m rtcnn.vet vet.ecsv -o page": Spec(extra=["--no-progress"],
                                                 writes=["page/index.html"]),
    "python -m rtcnn.baseline example/pair_0000/ref.fits example/pair_0000/new.fits -o base.ecsv": Spec(
        writes=["base.ecsv"]),
    "python -m rtcnn.score cands.ecsv base.ecsv --truth example/pair_0000/truth.ecsv --plot completeness.png": Spec(
        writes=["completeness.png"]),
    "python -m rtcnn.sim pairs --pairs 3 --size 256 --mode epochs --seed 2": Spec(
        extra=["--no-progress"], writes=["pairs/pair_0002/new.fits"]),
    "python -m rtcnn.detect pairs -o pairs-cands": Spec(
        extra=["--no-progress"], writes=["pairs-cands/pair_0000.ecsv",
                                         "pairs-cands/pair_0002.ecsv"]),
    "python -m rtcnn.survey pairs -o survey --workers 2": Spec(
        extra=["--cluster", "inproc.yaml", "--no-progress"], check="survey",
        writes=["survey/catalogs/pair_0000.ecsv", "survey/manifest.parquet",
                "survey/survey.parquet", "survey/summary.json"]),
    "python -m rtcnn.survey /scratch/$USER/pairs.ecsv -o /scratch/$USER/survey --device cuda --cluster slurm_gpu_example --workers 16": Spec(
        "parse", reason="needs a SLURM cluster with GPUs"),
    "python -m rtcnn.models": Spec(check="models"),
    "python -m rtcnn.models dense --json": Spec(check="models"),
    "python -m rtcnn.train": Spec(extra=[*TRAIN_FAST, *ATTN5_SMALL, "TINY_DATA"], check="train_run",
                                  writes=["outputs/train/runs/*/checkpoints/last.ckpt",
                                          "outputs/train/runs/*/tensorboard"]),
    "python -m rtcnn.evaluate ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt": Spec(
        extra=["max_tiles=16", "views=[identity,flip_x]"],
        writes=["outputs/train/runs/*/eval/*/metrics.json",
                "outputs/train/runs/*/eval/*/predictions.ecsv"]),
    "python -m rtcnn.train ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt": Spec(
        extra=[*TRAIN_FAST, *ATTN5_SMALL, "TINY_DATA", "trainer.max_epochs=2"]),
    "python -m rtcnn.export outputs/train/runs/<time>/checkpoints/last.ckpt -o my-attn5": Spec(
        writes=["my-attn5/model.safetensors", "my-attn5/card.json"]),
    "python -m rtcnn.train experiment=dense": Spec(
        extra=[*TRAIN_FAST, "data.root=pairs", "data.pairs=3", "data.size=256",
               "data.sim_seed=2", *PAIRS_DATA, *NO_PANELS, "model.net.channels=[4,4,4]",
               "model.net.head_channels=4"],
        reason="12 full SCA pairs, ~1 h: run on the README's pairs/ set, 1 short epoch"),
    "python -m rtcnn.train data=fits data.root='pairs/pair_*'": Spec(
        extra=[*TRAIN_FAST, *ATTN5_SMALL, *PAIRS_DATA]),
    "python -m rtcnn.train experiment=stargal": Spec(
        extra=[*TRAIN_FAST, "data.root=stargal-tiny", "data.pairs=3", "data.size=128",
               "data.val_fraction=0.34", "data.test_fraction=0.34"],
        writes=["outputs/stargal/runs/*/checkpoints/last.ckpt"]),
    "python -m rtcnn.train experiment=autoencoder": Spec(
        extra=[*TRAIN_FAST, *NO_PANELS, "TINY_DATA"],
        writes=["outputs/autoencoder/runs/*/checkpoints/last.ckpt"]),
    "python -m rtcnn.train model=attn5 trainer=gpu": Spec("compose", reason="needs a CUDA GPU"),
    "python -m rtcnn.train experiment=paper": Spec(
        "compose", reason="a GPU run (7000 epochs); its result is in the README's table"),
    "python -m rtcnn.train trainer=ddp trainer.devices=4": Spec(
        "compose", reason="4 devices (tests/test_train.py runs DDP with 2 CPU processes)"),
    "python -m rtcnn.train -m model.optimizer.lr=1e-2,1e-3 data.batch_size=16,32": Spec(
        "compose", reason="4 default trainings (one is run above); every combination is "
        "composed (tests/test_train.py runs a real 2-value multirun)"),
    "python -m rtcnn.train hparams_search=optuna": Spec(
        "compose", reason="an Optuna study of many full trainings"),
    "python -m rtcnn.train -m hydra/launcher=slurm trainer=gpu model.optimizer.lr=1e-3,3e-4": Spec(
        "compose", reason="needs a SLURM cluster with GPUs"),
    "python -m rtcnn.train data=openuniverse data.root=/path/to/RomanTDS": Spec(
        "compose", reason="needs the OpenUniverse 2024 files (tests/test_openuniverse.py "
        "trains on a small copy of its layout)"),
    "tensorboard --logdir outputs": Spec(check="tensorboard"),
    "python -m rtcnn.train data=openuniverse data.root=s3://nasa-irsa-simulations/openuniverse2024/roman/preview/RomanTDS data.pair_list=my_pairs.csv": Spec(
        "compose", reason="reads the public S3 archive (network); tests/test_remote.py runs "
        "it against a local moto S3 server"),
    "python -m rtcnn.train data=openuniverse data.root=s3://nasa-irsa-simulations/openuniverse2024/roman/preview/RomanTDS data.bands=[H158] data.pointings=[1200,1201,1202,1210] data.scas=[3,4]": Spec(
        "compose", reason="reads the public S3 archive (network); tests/test_remote.py runs "
        "it against a local moto S3 server"),
}


# ------------------------------------------------------------------ reading the README
def readme_commands(text: str | None = None) -> list[str]:
    """The shell commands of the README's ```bash blocks, in order, comments stripped.

    A line ending in ``\\`` continues on the next; ``#`` starts a comment outside quotes.
    """
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
            lexer.whitespace_split, lexer.commenters = True, "#"
            if list(lexer):  # not blank, not only a comment
                commands.append(_strip_comment(line))
    return commands


def _strip_comment(line: str) -> str:
    """``line`` without its trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.strip()


# ------------------------------------------------------------------ running one command
@dataclass
class Result:
    code: int
    output: str
    seconds: float = 0.0


@contextlib.contextmanager
def _argv_env(argv: list[str], workdir: Path):
    """``sys.argv``, the working directory and ``PROJECT_ROOT`` of one command; the
    environment and torch's thread count are restored after it (the rest of the suite
    runs in this process too)."""
    import torch

    old_argv, old_cwd, old_env = sys.argv, os.getcwd(), dict(os.environ)
    old_threads = torch.get_num_threads()
    sys.argv = argv
    os.chdir(workdir)
    os.environ["PROJECT_ROOT"] = str(workdir)
    try:
        yield
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        torch.set_num_threads(old_threads)


def run_module(module: str, args: list[str], workdir: Path) -> Result:
    """``python -m MODULE ARGS`` in this process, in ``workdir``: exit code and output."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    code, t0 = 0, time.perf_counter()
    buffer = io.StringIO()
    with _argv_env([module, *args], workdir), warnings.catch_warnings(), \
            contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # noqa: BLE001 - an uncaught error: Python's traceback and exit 1
            traceback.print_exc(file=buffer)
            code = 1
        finally:
            logging.getLogger().handlers.clear()  # Hydra's file handlers point into workdir
            GlobalHydra.instance().clear()
    return Result(code, buffer.getvalue(), time.perf_counter() - t0)


def expand(command: str, workdir: Path) -> list[str]:
    """The README command's words, ``<time>`` replaced by the newest training run."""
    words = shlex.split(command)
    if any("<time>" in w for w in words):
        runs = sorted((workdir / "outputs" / "train" / "runs").iterdir())
        words = [w.replace("<time>", runs[0].name) for w in words]  # the first run's
    return words


def compose_overrides(words: list[str]) -> list[list[str]]:
    """Every job's overrides of a ``python -m rtcnn.train [-m] ...`` command line."""
    import itertools

    overrides = [w for w in words[3:] if w != "-m"]
    if "-m" not in words:
        return [overrides]
    axes = []
    for o in overrides:
        key, _, value = o.partition("=")
        values = value.split(",") if "," in value and not value.startswith("[") else [value]
        axes.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)]


def compose(overrides: list[str]) -> None:
    """Compose conf/train.yaml with ``overrides`` as Hydra does (an error if it cannot)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.model._target_ and cfg.data._target_


def parse_only(words: list[str]) -> None:
    """The command's argparse parser accepts ``words`` (``python -m MODULE ARGS``)."""
    import importlib

    module = importlib.import_module(words[2])
    module.build_parser().parse_args(words[3:])


# ------------------------------------------------------------------ the run, once
@pytest.fixture(scope="session")
def readme_run(tmp_path_factory, tiny_sim):
    """Every README command run in order in one fresh directory: {command: Result}."""
    workdir = tmp_path_factory.mktemp("readme")
    (workdir / "inproc.yaml").write_text(
        "kind: local\nworkers: null\nthreads: 1\ncluster:\n  processes: false\n"
        "  threads_per_worker: 1\n  dashboard_address: null\n")
    results = {}
    for command in readme_commands():
        spec = COMMANDS.get(command)
        if spec is None or spec.kind != "run" or spec.check in ("activate", "tensorboard"):
            continue
        words = expand(command, workdir)
        if words[:2] != ["python", "-m"]:
            raise AssertionError(f"no runner for {command!r}")
        extra = [e for x in spec.extra for e in (tiny_data(tiny_sim) if x == "TINY_DATA" else [x])]
        results[command] = run_module(words[2], [*words[3:], *extra], workdir)
        print(f"{results[command].seconds:6.1f} s  exit {results[command].code}  {command}")
    return workdir, results


# ------------------------------------------------------------------ the tests
def test_every_readme_command_is_in_the_table():
    commands = readme_commands()
    assert len(commands) >= 20, commands
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, ("README commands with no entry in tests/test_readme.py COMMANDS "
                         f"(add how each runs here): {missing}")
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"COMMANDS entries no longer in the README: {stale}"
    for c, spec in COMMANDS.items():
        assert spec.kind in ("run", "parse", "compose", "elsewhere"), c
        assert spec.kind == "run" or spec.reason, f"{c}: a skipped command needs its reason"


def test_the_readme_says_how_to_use_the_environment_before_any_python_command():
    commands = readme_commands()
    first_python = next(i for i, c in enumerate(commands) if c.startswith(("python", "tensorboard")))
    assert "source .venv/bin/activate" in commands[:first_python]


def _run_cases():
    return [pytest.param(c, id=_id(c)) for c in readme_commands() if c in COMMANDS]


def _id(command: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", command)[:80]


@pytest.mark.parametrize("command", _run_cases())
def test_readme_command(command, request, tmp_path):
    spec = COMMANDS[command]
    needs_run = spec.kind == "run" or spec.check == "demo"
    workdir, results = request.getfixturevalue("readme_run") if needs_run else (tmp_path, {})
    if spec.kind == "run" and command in results:
        result = results[command]
        assert result.code == 0, f"{command!r} exited {result.code}:\n{result.output[-3000:]}"
    if spec.check:
        globals()[f"check_{spec.check}"](command, workdir, results, tmp_path)
    elif spec.kind == "compose":
        for overrides in compose_overrides(shlex.split(command)):
            compose(overrides)
    elif spec.kind == "parse":
        parse_only(shlex.split(os.path.expandvars(command)))
    elif spec.kind == "elsewhere" and spec.covered_by.count("::"):
        path, name = spec.covered_by.split("::")
        assert f"def {name}(" in (REPO / path).read_text(), f"{spec.covered_by} is gone"
    for pattern in spec.writes:
        assert list(workdir.glob(pattern)), f"{command!r} did not write {pattern}"


# ------------------------------------------------------------------ per-command checks
def check_catalog(command, workdir, results, tmp_path):
    from astropy.table import Table

    cat = Table.read(workdir / "cands.ecsv", format="ascii.ecsv")
    assert {"x", "y", "ra", "dec", "reliability", "flags"} <= set(cat.colnames)
    assert len(cat) > 0 and cat.meta.get("model")


def check_models(command, workdir, results, tmp_path):
    out = results[command].output
    if "--json" in command:
        assert json.loads(out)["dense"]["threshold"] == 0.5, out[:500]
    else:
        assert "dense" in out and "attn5" in out, out[:500]


def check_aligned(command, workdir, results, tmp_path):
    from astropy.table import Table

    meta = Table.read(workdir / "rolled.ecsv", format="ascii.ecsv").meta
    assert meta["align_method"] == "spline3" and meta["align_grid_offset_px"] > 1, meta


def check_alerts(command, workdir, results, tmp_path):
    from astropy.table import Table

    cat = Table.read(workdir / "vet.ecsv", format="ascii.ecsv")
    assert len(list((workdir / "alerts").glob("*.avro"))) == len(cat) > 0
    assert len(list((workdir / "vet_cutouts").glob("*.fits"))) == len(cat)


def check_survey(command, workdir, results, tmp_path):
    summary = json.loads((workdir / "survey" / "summary.json").read_text())
    assert (summary["pairs"], summary["done"], summary["failed"]) == (3, 3, {}), summary


def check_train_run(command, workdir, results, tmp_path):
    run = min((workdir / "outputs" / "train" / "runs").iterdir())
    assert (run / ".hydra" / "config.yaml").is_file()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))


def check_activate(command, workdir, results, tmp_path):
    """``source .venv/bin/activate`` for real: then ``python`` has rtcnn and Hydra."""
    activate = VENV_BIN / "activate"
    if not activate.is_file():
        pytest.skip(f"this suite does not run in a virtual environment ({sys.executable})")
    script = (f"source {shlex.quote(str(activate))} && "
              "python -c 'import sys, hydra, rtcnn; print(sys.prefix)'")
    proc = subprocess.run(["bash", "-c", script],
                          capture_output=True, text=True, check=False, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == Path(sys.prefix).resolve()


def check_tensorboard(command, workdir, results, tmp_path):
    """``tensorboard --logdir outputs`` serves; here ``--inspect`` reads the same logdir and
    exits (it must find the training runs' event files)."""
    exe = shutil.which("tensorboard", path=str(VENV_BIN))
    assert exe, f"no tensorboard in {VENV_BIN}"
    tensorboard_inspect([exe, *shlex.split(command)[1:]], workdir)


def tensorboard_inspect(words: list[str], cwd: Path) -> None:
    """``tensorboard ... --inspect``: exits 0 and finds the training runs' event files."""
    proc = subprocess.run([*words, "--inspect"], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Found event files" in proc.stdout + proc.stderr, proc.stdout[-2000:]


def check_make_test(command, workdir, results, tmp_path):
    proc = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "pytest" in proc.stdout, proc.stdout + proc.stderr


def check_demo(command, workdir, results, tmp_path):
    """``make demo`` runs rtcnn.demo; what the demo prints can be pasted as printed: its
    commands start with an existing executable, and its TensorBoard line names one."""
    proc = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "-m rtcnn.demo" in proc.stdout, proc.stdout + proc.stderr
    from rtcnn import demo

    printed = []
    patches = {"_run": printed.append}  # the steps' commands, not run (tests/test_demo.py)
    if hasattr(demo, "detection"):
        patches["detection"] = lambda out: {k: tmp_path / k for k in
                                            ("catalog", "regions", "png", "score")}
    old = {name: getattr(demo, name) for name in patches}
    buffer = io.StringIO()
    try:
        for name, value in patches.items():
            setattr(demo, name, value)
        with _argv_env(["rtcnn.demo"], tmp_path), contextlib.redirect_stdout(buffer):
            demo.main([])
    finally:
        for name, value in old.items():
            setattr(demo, name, value)
    lines = buffer.getvalue().splitlines()
    assert printed and all(Path(cmd[0]).is_file() for cmd in printed), printed
    for line in lines:  # a command named in the summary starts with an executable
        for m in re.finditer(r"(\S+) -m rtcnn\.", line):
            assert Path(m.group(1)).is_file(), f"not an executable: {line!r}"
    (tb,) = [ln for ln in lines if "TensorBoard" in ln]
    exe = tb.split(":", 1)[1].split()[0]
    assert Path(exe).is_file() and os.access(exe, os.X_OK), f"not an executable: {tb!r}"
    logdir = min((workdir / "outputs" / "train" / "runs").iterdir()) / "tensorboard"
    tensorboard_inspect([exe, "--logdir", str(logdir)], tmp_path)


# ------------------------------------------------------------------ make help
def test_make_help_lists_every_target_as_the_readme_does():
    proc = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    listed = dict(re.findall(r"^\s*make (\S+)\s+(.+?)\s*$", proc.stdout, flags=re.MULTILINE))
    makefile = (REPO / "Makefile").read_text()
    targets = {t for t in re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE)}
    assert targets <= set(listed), f"targets without a ## description: {targets - set(listed)}"
    readme = dict(re.findall(r"^\| `make (\S+)` \| (.+?) \|$", README.read_text(), flags=re.MULTILINE))
    assert readme == listed, {"make help": listed, "README": readme}


# ------------------------------------------------------------------ the module list
def test_the_readme_names_every_module():
    """The README's module table names every module of the package (a new one is added
    there too): ``rtcnn/x.py`` itself, or ``x`` in the ``rtcnn/{a,b,...}.py`` row, and a
    sub-package's modules in its ``rtcnn/pkg/`` row."""
    text = README.read_text()
    rows = {}
    for row in re.findall(r"^\| (`rtcnn/.+?) \| (.+?) \|$", text, flags=re.MULTILINE):
        for name in re.findall(r"`(rtcnn/[^`]+)`", row[0]):
            rows[name] = row[1]
    grouped = {m for name in rows for group in re.findall(r"\{(.+?)\}", name)
               for m in group.split(",")}
    missing = []
    for path in sorted((REPO / "rtcnn").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        parts = rel.split("/")
        if len(parts) == 2:  # rtcnn/x.py
            if rel not in rows and path.stem not in grouped:
                missing.append(rel)
            continue
        package = "/".join(parts[:-1]) + "/"
        while package not in rows and package.count("/") > 2:
            package = package.rsplit("/", 2)[0] + "/"
        described = rows.get(package, "") + " " + " ".join(rows)
        if path.name not in ("__init__.py", "__main__.py") and path.name not in described \
                and path.stem not in rows.get(package, ""):
            missing.append(rel)
    assert not missing, f"modules the README's module table does not name: {missing}"
