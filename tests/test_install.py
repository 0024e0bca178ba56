"""The package installs as users install it: a wheel (not `pip install -e`, which CI uses and which
hides a package that setup.py forgets), installed into a fresh directory and run from outside the
repository. No network: no dependencies are fetched (the test environment already has them)."""
import os
import shutil
import subprocess
import sys

from tests.nano import nano_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "data", "optim", "pretrain")

NANO = nano_yaml(optim={"name": "subtrack++", "lr": 1.0e-3, "rank": 8, "update_interval": 2},
                 train={"max_steps": 3, "warmup_steps": 0, "eval_batches": 1})


def pip(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "-q",
                             "--disable-pip-version-check"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_installs_and_trains_from_outside_the_repository(tmp_path):
    source = tmp_path / "source"  # what a source checkout holds, built outside the repository (no build/ left here)
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    for package in PACKAGES:
        shutil.copytree(os.path.join(ROOT, package), source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    wheels = list((tmp_path / "dist").glob("subtrack_pretrain-*.whl"))
    assert len(wheels) == 1
    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheels[0]), cwd=tmp_path)
    assert not (site / "tests").exists()  # tests are not installed as a package

    # A fresh environment that sees the test environment's dependencies but not its editable install of this
    # checkout (whose import hook would quietly supply any package the wheel lacks): a .pth line adds a
    # directory to sys.path without running the .pth files in it.
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    fresh_python = env_dir / "bin" / "python"
    fresh_site = subprocess.run([fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    with open(os.path.join(fresh_site, "dependencies.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "nano.yaml").write_text(NANO)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}  # the installed copy, not this checkout

    def python(*args):
        return subprocess.run([fresh_python, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=120)

    where = python("-c", "import pretrain.strategies.fsdp, optim.sharding.fsdp, data.sample, models.hf, pretrain.export; "
                         "print(pretrain.strategies.fsdp.__file__, optim.sharding.fsdp.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(site / "pretrain" / "strategies" / "fsdp.py"),
                                    str(site / "optim" / "sharding" / "fsdp.py")]
    usage = python("-m", "pretrain", "--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: pretrain"), usage.stderr
    trained = python("-m", "pretrain", "--config", "nano.yaml", "--set", "log.run_dir=run")
    assert trained.returncode == 0, trained.stderr
    assert (elsewhere / "run" / "checkpoints" / "step_00000003" / "manifest.json").is_file()
    assert "step       3 | checkpoint" in trained.stdout
