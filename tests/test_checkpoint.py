"""Checkpoints: atomic writes, keep-last-K, weights-only loading, RNG state round trip."""
import random

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain import resume, rundir
from pretrain.rng import rng_state, set_rng_state
from pretrain.state_io import PLAIN_OPTIMIZER, SHARDED_INDEX, PlainState, ShardedState


def _save(root, step, keep_last=3, value=0.0):
    return ckpt.save_checkpoint(
        root, step, state_files={"model.pt": {"w": torch.full((2, 2), value)}, PLAIN_OPTIMIZER: {
            "state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}},
        model_config={"hidden_size": 2}, trainer_state={"step": step, "data": [{"position": step}], "rng": rng_state()},
        config_yaml="name: test\n", keep_last=keep_last)


def test_checkpoint_layout_matches_architecture_doc_and_loads_weights_only(tmp_path):
    path = _save(tmp_path, 7, value=3.0)
    assert path.name == "step_00000007"
    names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert names == ["config.yaml", "manifest.json", "model.pt", "model_config.json", "optimizer/rank00000.pt",
                     "trainer.pt"]
    for name in ("model.pt", "optimizer/rank00000.pt", "trainer.pt"):
        torch.load(path / name, weights_only=True)  # raises if anything but plain data was pickled
    state = ckpt.load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((2, 2), 3.0))
    assert state["trainer"]["step"] == 7 and state["model_config"] == {"hidden_size": 2}


def test_interrupted_save_leaves_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    first = _save(tmp_path, 10, value=1.0)
    real_save = torch.save
    calls = []

    def crash_on_trainer(obj, f, *a, **k):
        calls.append(getattr(f, "name", str(f)))  # checkpoint files are written through Python file objects
        if calls[-1].endswith("trainer.pt"):
            raise OSError("disk full (simulated crash mid-save)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_trainer)
    with pytest.raises(OSError):
        _save(tmp_path, 20, value=2.0)
    monkeypatch.setattr(torch, "save", real_save)
    assert any(c.endswith("model.pt") for c in calls)  # the crash really happened mid-save
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    assert leftovers, "the partial save should be left in a temporary directory"
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert torch.equal(ckpt.load_checkpoint(first)["model"]["w"], torch.full((2, 2), 1.0))
    # a later complete save wins
    _save(tmp_path, 30)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000030"


def test_keep_last_k_deletes_oldest_checkpoints(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_save_after_a_rollback_keeps_the_new_checkpoint_and_sets_the_abandoned_newer_ones_aside(tmp_path):
    """Resumed from step 100 while 200 exists (--resume PATH, or a fallback past a damaged 200): saving
    150 with keep_last=1 must keep 150, and 200 must never be resumed from again, yet stays on disk."""
    for step in (100, 200):
        _save(tmp_path, step, keep_last=3)
    _save(tmp_path, 150, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000150"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000150"
    assert (tmp_path / "abandoned-step_00000200" / "model.pt").is_file()


def test_latest_is_by_step_number_not_name_order_or_time(tmp_path):
    import os

    _save(tmp_path, 99)
    _save(tmp_path, 100)
    os.utime(tmp_path / "step_00000099")  # touched later, but an earlier step
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000100"
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_resave_same_step_replaces_it(tmp_path):
    _save(tmp_path, 5, value=1.0)
    path = _save(tmp_path, 5, value=2.0)
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.full((2, 2), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]


def test_rng_state_round_trip_restores_python_numpy_and_torch_streams(tmp_path):
    np = pytest.importorskip("numpy")
    random.seed(1), torch.manual_seed(1), np.random.seed(1)
    path = _save(tmp_path, 1)
    expected = (random.random(), torch.rand(3), np.random.rand(3))
    random.seed(2), torch.manual_seed(2), np.random.seed(2)
    set_rng_state(ckpt.load_checkpoint(path)["trainer"]["rng"])
    got = (random.random(), torch.rand(3), np.random.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and (got[2] == expected[2]).all()


def _model_and_config(name="subtrack++"):
    from models.sizes import build_model, get_config
    from optim.factory import OptimConfig

    torch.manual_seed(0)
    model = build_model(get_config("nano", vocab_size=64, max_seq_len=8))
    return model, OptimConfig(name=name, rank=4, update_interval=2)


def _stepped(model, optimizer, steps=3):
    for _ in range(steps):
        model(torch.randint(0, 64, (2, 8))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def _by_name(optimizer) -> dict:
    """Optimizer state keyed by parameter name, whichever kind of optimizer."""
    if hasattr(optimizer, "save_sharded"):
        return optimizer.state_dict()["state"]
    names = [n for g in optimizer.param_groups for n in g["names"]]
    return {names[i]: s for i, s in optimizer.state_dict()["state"].items()}


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), (name, key)


def test_sharded_optimizer_dir_staged_by_the_ranks_is_renamed_in_with_its_index(tmp_path):
    from optim.sharded import build_sharded_optimizer

    model, cfg = _model_and_config()
    optimizer = _stepped(model, build_sharded_optimizer(model, cfg, reduce_gradients=True))
    with pytest.raises(FileNotFoundError, match="save_sharded"):  # nothing staged yet
        ckpt.save_checkpoint(tmp_path, 4, state_files={}, staged=SHARDED_INDEX, model_config={}, trainer_state={},
                             config_yaml="", keep_last=1)
    ckpt.prepare_staging(tmp_path, 4)
    ShardedState().write_shards(ckpt.staging_dir(tmp_path, 4), optimizer)
    path = ckpt.save_checkpoint(tmp_path, 4, state_files=ShardedState().rank0_files(model.state_dict(), optimizer),
                                staged=SHARDED_INDEX, model_config={}, trainer_state={"step": 4}, config_yaml="",
                                keep_last=1)
    assert sorted(p.name for p in (path / "optimizer").iterdir()) == ["index.json", "rank00000.pt"]
    assert not ckpt.staging_dir(tmp_path, 4).exists()


@pytest.mark.parametrize("saved_sharded, loaded_sharded", [(True, False), (False, True), (True, True)])
def test_state_io_reads_either_format_into_either_optimizer(tmp_path, saved_sharded, loaded_sharded):
    """One process <-> sharded: state moves by parameter name, nothing lost or reordered (the
    2-rank versions run in tests/test_distributed_training.py)."""
    from optim.factory import build_optimizer
    from optim.sharded import build_sharded_optimizer

    def make(model, sharded):
        return build_sharded_optimizer(model, cfg, reduce_gradients=True) if sharded else build_optimizer(model, cfg)

    model, cfg = _model_and_config()
    saved = _stepped(model, make(model, saved_sharded))
    io = {True: ShardedState(), False: PlainState()}
    ckpt.prepare_staging(tmp_path, 3)
    io[saved_sharded].write_shards(ckpt.staging_dir(tmp_path, 3), saved)
    path = ckpt.save_checkpoint(tmp_path, 3, state_files=io[saved_sharded].rank0_files(model.state_dict(), saved),
                                staged=io[saved_sharded].staged, model_config={}, trainer_state={}, config_yaml="",
                                keep_last=1)
    fresh = make(model, loaded_sharded)
    io[loaded_sharded].load(path, model, fresh)
    _assert_same_state(_by_name(fresh), _by_name(saved))
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in saved.param_groups]


# ----------------------------------------------------------------------------- manifest, manager, lock

import errno  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402


def _manager_save(manager, step, value=0.0):
    return manager.save(step, model_state={"w": torch.full((64, 64), value)}, optimizer=torch.optim.SGD(
        [torch.nn.Parameter(torch.zeros(2))], lr=0.1), trainer_state={"step": step}, model_config={"hidden_size": 2},
        config_yaml="name: test\n")


def test_manifest_is_written_last_and_covers_every_file_with_size_and_sha256(tmp_path, monkeypatch):
    order = []
    real_write = ckpt._write
    monkeypatch.setattr(ckpt, "_write", lambda path, obj: (order.append(path.name), real_write(path, obj)))
    path = _save(tmp_path, 3)
    assert order[-1] == "manifest.json"
    files = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(files) == [n for n in on_disk if n != "manifest.json"]
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) is None


def test_manifest_covers_the_optimizer_shards_the_ranks_staged(tmp_path):
    ckpt.prepare_staging(tmp_path, 4)
    staged = ckpt.staging_dir(tmp_path, 4) / "optimizer"
    for rank in (0, 1):  # what two ranks' save_sharded leave before rank 0 saves the rest
        torch.save({"state": {}, "param_groups": []}, staged / f"rank{rank:05d}.pt")
    (staged / "index.json").write_text("{}")
    path = ckpt.save_checkpoint(tmp_path, 4, state_files={"model.pt": {}}, staged=SHARDED_INDEX, model_config={},
                                trainer_state={}, config_yaml="", keep_last=1)
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert {"optimizer/rank00000.pt", "optimizer/rank00001.pt", "optimizer/index.json"} <= set(files)
    (path / "optimizer" / "rank00001.pt").write_bytes(b"")  # a lost shard is found too
    assert ckpt.verify_checkpoint(path) == f"optimizer/rank00001.pt: size 0 != {files['optimizer/rank00001.pt']['size']}"


def test_verify_names_the_damaged_file_and_accepts_an_old_checkpoint_without_manifest(tmp_path):
    path = _save(tmp_path, 1)
    size = (path / "model.pt").stat().st_size
    (path / "model.pt").write_bytes((path / "model.pt").read_bytes()[:100])
    assert ckpt.verify_checkpoint(path) == f"model.pt: size 100 != {size}"
    path = _save(tmp_path, 2)
    size = json.loads((path / "manifest.json").read_text())["files"]["model_config.json"]["size"]
    (path / "model_config.json").write_text("x" * size)  # garbage of the same size: the checksum finds it
    assert ckpt.verify_checkpoint(path) == "model_config.json: sha256 differs from manifest.json"
    path = _save(tmp_path, 3)
    (path / "trainer.pt").unlink()
    assert ckpt.verify_checkpoint(path) == "trainer.pt: missing"
    (path / "manifest.json").unlink()  # as older code wrote them: usable only with model.pt and trainer.pt
    assert ckpt.verify_checkpoint(path) == "trainer.pt: missing (and no manifest.json to check the rest)"
    path = _save(tmp_path, 4)
    (path / "manifest.json").unlink()
    assert ckpt.verify_checkpoint(path) is None


def test_resolve_auto_falls_back_to_the_newest_checkpoint_that_verifies_with_one_warning(tmp_path):
    lines = []
    manager = ckpt.CheckpointManager(tmp_path, keep_last=5, say=lambda *a, **k: lines.append(a[0]))
    good, bad = _manager_save(manager, 10), _manager_save(manager, 20)
    (bad / "model.pt").write_bytes(b"x")
    assert manager.resolve("auto") == good
    assert len(lines) == 1 and f"{bad} is damaged (model.pt: size 1 != " in lines[0] and lines[0].endswith(f"using {good}")
    assert manager.resolve(None) is None
    with pytest.raises(resume.ResumeError, match=r"step_00000020 is damaged \(model.pt: size 1 != \d+\); pass another"):
        manager.resolve(str(bad))
    (good / "trainer.pt").unlink()
    with pytest.raises(resume.ResumeError, match="no checkpoint in .* verifies"):
        manager.resolve("auto")


def test_full_disk_is_one_line_naming_the_file_and_leaves_no_staging_directory(tmp_path, monkeypatch):
    manager = ckpt.CheckpointManager(tmp_path, keep_last=5)
    first = _manager_save(manager, 1, value=1.0)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if getattr(f, "name", "").endswith("model.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError) as error:
        _manager_save(manager, 2)
    message = str(error.value)
    assert message == (f"checkpoint: no space left on device while writing "
                       f"{ckpt.staging_dir(tmp_path, 2) / 'model.pt'}; the previous checkpoint {first} is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no .tmp- left behind
    assert ckpt.verify_checkpoint(first) is None


def test_any_error_while_saving_is_one_line_naming_the_file_and_leaves_no_staging_directory(tmp_path, monkeypatch):
    manager = ckpt.CheckpointManager(tmp_path, keep_last=5)
    first = _manager_save(manager, 1, value=1.0)
    real_save = torch.save

    def zip_writer_fails(obj, f, *a, **k):  # what torch's zip writer raises once the disk filled up
        if getattr(f, "name", "").endswith("model.pt"):
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    with pytest.raises(ckpt.CheckpointWriteError) as error:
        _manager_save(manager, 2)
    assert str(error.value) == (
        f"checkpoint: RuntimeError: [enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64 while "
        f"writing {ckpt.staging_dir(tmp_path, 2) / 'model.pt'}; the previous checkpoint {first} is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert ckpt.verify_checkpoint(first) is None
    full = types.SimpleNamespace(total=1 << 30, used=1 << 30, free=0)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: full)  # a full disk is named as such
    with pytest.raises(ckpt.CheckpointWriteError, match="^checkpoint: no space left on device while writing "):
        _manager_save(manager, 2)


def test_a_checkpoint_without_manifest_is_verified_by_reading_it_and_auto_falls_back_past_it(tmp_path):
    lines = []
    manager = ckpt.CheckpointManager(tmp_path, keep_last=5, say=lambda *a, **k: lines.append(a[0]))
    good, bad = _manager_save(manager, 10), _manager_save(manager, 20)
    for path in (good, bad):  # as older code wrote them
        (path / "manifest.json").unlink()
    assert ckpt.verify_checkpoint(good) is None and ckpt.verify_checkpoint(bad) is None
    data = (bad / "optimizer" / "rank00000.pt").read_bytes()
    (bad / "optimizer" / "rank00000.pt").write_bytes(data[:len(data) // 2])  # truncated
    problem = ckpt.verify_checkpoint(bad)
    assert problem.startswith("optimizer/rank00000.pt: unreadable without manifest.json (RuntimeError: ")
    assert manager.resolve("auto") == good
    assert lines == [f"resume: checkpoint {bad} is damaged ({problem}); using {good}"]
    (good / "model_config.json").write_text("{not json")
    assert ckpt.verify_checkpoint(good).startswith("model_config.json: unreadable without manifest.json (JSONDecodeError")


def test_config_changes_refuses_shape_and_method_and_lets_schedule_settings_change():
    saved = {"name": "a", "model": {"size": "nano"}, "data": {"tokenizer": "sample"},
             "optim": {"name": "subtrack++", "lr": 0.01, "rank": 8, "subspace": None, "state_bits": 32},
             "train": {"max_steps": 10, "seed": 0}, "checkpoint": {"resume": None}}
    new = json.loads(json.dumps(saved))
    new["optim"].update(lr=0.05, subspace="grassmann")  # grassmann is subtrack++'s own choice: no change
    new["train"].update(max_steps=20, seed=1)
    new["checkpoint"]["resume"] = "auto"
    fixed, changed = resume.config_changes(saved, new, {"hidden_size": 64, "init_std": 0.02},
                                         {"hidden_size": 64, "init_std": 0.01})
    assert fixed == []
    assert changed == [("optim.lr", 0.01, 0.05, "takes effect"), ("train.max_steps", 10, 20, "takes effect"),
                       ("train.seed", 0, 1, "ignored: the checkpoint's RNG state continues")]
    for section, key, value in [("optim", "rank", 4), ("optim", "name", "galore"), ("optim", "moments", "keep"),
                                ("optim", "state_bits", 8), ("data", "tokenizer", "other.model")]:
        other = json.loads(json.dumps(saved))
        other[section][key] = value
        assert resume.config_changes(saved, other, {}, {})[0][0][0] == f"{section}.{key}"
    # Settings behind the saved optimizer tensors and the saved data position are fixed too.
    for section, key, value in [("optim", "accumulate", True), ("optim", "basis_dtype", "bfloat16"),
                                ("data", "seq_len", 64), ("data", "source", "/other/c4")]:
        before, after = json.loads(json.dumps(saved)), json.loads(json.dumps(saved))
        before[section][key] = {"accumulate": False, "basis_dtype": "float32", "seq_len": 32, "source": "sample"}[key]
        after[section][key] = value
        assert resume.config_changes(before, after, {}, {})[0][0][0] == f"{section}.{key}"
    fixed, _ = resume.config_changes(saved, saved, {"hidden_size": 64}, {"hidden_size": 128})
    assert fixed == [("model.hidden_size", 64, 128)]


HOLD_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pretrain.rundir import locked_run_dir
with locked_run_dir(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_run_dir_lock_names_the_holder_and_is_released_when_the_holder_is_killed(tmp_path):
    import os
    import signal

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, root, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirLocked, match=f"in use by pid {holder.pid} on "):
            with rundir.locked_run_dir(tmp_path):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.wait()
    with rundir.locked_run_dir(tmp_path):
        assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    with rundir.locked_run_dir(tmp_path):  # released at the end of the block
        pass


def test_a_run_dir_that_cannot_hold_a_lock_is_one_message_not_an_exception(tmp_path):
    """An OSError on rank 0 (the run dir under a regular file, a full disk) must become the message every
    rank raises, never an exception that leaves the other ranks waiting in the collective."""
    (tmp_path / "file").write_text("x")
    fd, problem = rundir._try_lock(tmp_path / "file" / "run")
    assert fd is None and "cannot create the lock file" in problem
    with pytest.raises(rundir.RunDirLocked, match="cannot create the lock file"):
        with rundir.locked_run_dir(tmp_path / "file" / "run"):
            pass


def test_metrics_after_the_resumed_step_are_dropped_from_jsonl(tmp_path):
    from pretrain.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3, 4):
        logger.log(step, {"train/loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "trai')  # torn by a crash
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
    logger.log(3, {"train/loss": 30.0})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    # A resume that found no checkpoint (a crash before the first save) starts over: nothing is kept.
    MetricsLogger(tmp_path, tensorboard=False, resume_step=-1).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def _full_disk_on_rank_1_job(root):
    """On each of 2 gloo ranks: a sharded save at step 1, then one at step 2 whose shard write on
    rank 1 only hits a full disk. Returns (what save(2) raised on this rank, the checkpoints left)."""
    import torch.distributed as dist

    from optim.sharded import build_sharded_optimizer

    model, cfg = _model_and_config()
    optimizer = _stepped(model, build_sharded_optimizer(model, cfg, reduce_gradients=True), steps=1)
    manager = ckpt.CheckpointManager(root, keep_last=3, io=ShardedState(), rank=dist.get_rank(), world_size=2)

    def save(step):
        return manager.save(step, model_state=model.state_dict(), optimizer=optimizer, trainer_state={"step": step},
                            model_config={}, config_yaml="")

    save(1)
    real_save = torch.save
    if dist.get_rank() == 1:
        torch.save = lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    try:
        save(2)
        raised = None
    except ckpt.CheckpointWriteError as e:
        raised = str(e)
    finally:
        torch.save = real_save
    dist.barrier()
    return raised, sorted(p.name for p in root.iterdir())


def test_full_disk_on_one_rank_fails_the_save_on_every_rank_without_hanging(tmp_path):
    from tests.distributed import run_distributed

    results = run_distributed(_full_disk_on_rank_1_job, 2, tmp_path, timeout=120)
    first = tmp_path / "step_00000001"
    for raised, left in results:  # the same one-line report on both ranks, rank 1's file named
        assert raised == (f"checkpoint: no space left on device while writing {ckpt.staging_dir(tmp_path, 2)}"
                          f"/optimizer/rank00001.pt; the previous checkpoint {first} is intact")
        assert left == ["step_00000001"]
    assert ckpt.verify_checkpoint(first) is None
