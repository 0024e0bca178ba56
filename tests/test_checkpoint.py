"""Checkpoints: atomic writes, keep-last-K, weights-only loading, RNG state round trip."""
import random

import pytest
import torch

from pretrain import checkpoint as ckpt


def _save(root, step, keep_last=3, value=0.0):
    return ckpt.save_checkpoint(
        root, step, model_state={"w": torch.full((2, 2), value)}, model_config={"hidden_size": 2},
        optimizer_state={"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        trainer_state={"step": step, "data": [{"position": step}], "rng": ckpt.rng_state()},
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


def test_latest_is_by_step_number_not_name_order_or_time(tmp_path):
    _save(tmp_path, 100)
    _save(tmp_path, 99)  # written later, but an earlier step
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
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["trainer"]["rng"])
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
        ckpt.save_checkpoint(tmp_path, 4, model_state={}, model_config={}, optimizer_state=None, trainer_state={},
                             config_yaml="", keep_last=1)
    ckpt.prepare_staging(tmp_path, 4)
    optimizer.save_sharded(str(ckpt.staging_dir(tmp_path, 4) / "optimizer"))
    path = ckpt.save_checkpoint(tmp_path, 4, model_state=model.state_dict(), model_config={}, optimizer_state=None,
                                trainer_state={"step": 4}, config_yaml="", keep_last=1)
    assert sorted(p.name for p in (path / "optimizer").iterdir()) == ["index.json", "rank00000.pt"]
    assert not ckpt.staging_dir(tmp_path, 4).exists()


@pytest.mark.parametrize("saved_sharded, loaded_sharded", [(True, False), (False, True), (True, True)])
def test_load_optimizer_reads_either_format_into_either_optimizer(tmp_path, saved_sharded, loaded_sharded):
    """One process <-> sharded: state moves by parameter name, nothing lost or reordered (the
    2-rank versions run in tests/test_distributed_training.py)."""
    from optim.factory import build_optimizer
    from optim.sharded import build_sharded_optimizer

    def make(model, sharded):
        return build_sharded_optimizer(model, cfg, reduce_gradients=True) if sharded else build_optimizer(model, cfg)

    model, cfg = _model_and_config()
    saved = _stepped(model, make(model, saved_sharded))
    if saved_sharded:
        ckpt.prepare_staging(tmp_path, 3)
        saved.save_sharded(str(ckpt.staging_dir(tmp_path, 3) / "optimizer"))
    path = ckpt.save_checkpoint(tmp_path, 3, model_state={}, model_config={},
                                optimizer_state=None if saved_sharded else saved.state_dict(), trainer_state={},
                                config_yaml="", keep_last=1)
    fresh = make(model, loaded_sharded)
    ckpt.load_optimizer(fresh, path)
    _assert_same_state(_by_name(fresh), _by_name(saved))
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in saved.param_groups]
