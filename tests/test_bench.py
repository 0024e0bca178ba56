"""Benchmarks `python -m pretrain.bench {optimizer,comm}` at their smallest settings: the tables
have their rows, the ratio columns agree with the figures they divide, and the byte counts
agree with closed forms (analytic optimizer state, ring collective volumes)."""
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch

from pretrain import memory
from pretrain.bench import __main__ as dispatcher
from pretrain.bench import comm
from pretrain.bench import optimizer as bench_optimizer


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------

def test_dispatcher_without_command_prints_usage_and_returns_2(capsys):
    assert dispatcher.main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m pretrain.bench COMMAND")
    for name in dispatcher.COMMANDS:
        assert f"  {name} " in out


def test_dispatcher_help_returns_0_and_unknown_command_returns_2(capsys):
    assert dispatcher.main(["--help"]) == 0
    assert dispatcher.main(["-h"]) == 0
    assert dispatcher.main(["nonsense"]) == 2
    assert capsys.readouterr().out.count("usage:") == 3


def test_python_m_pretrain_bench_exit_codes():
    """The module entry point hands main's return value to the shell."""
    plain = subprocess.run([sys.executable, "-m", "pretrain.bench"], capture_output=True, text=True)
    assert plain.returncode == 2 and "usage:" in plain.stdout
    helped = subprocess.run([sys.executable, "-m", "pretrain.bench", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "commands:" in helped.stdout


# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------

def _table_rows(out: str, size: str) -> dict[str, list[str]]:
    """{method: columns} of the first table's rows for `size`."""
    first_table = out.split("subspace update alone")[0]
    return {cols[1]: cols for cols in (line.split() for line in first_table.splitlines())
            if len(cols) == 11 and cols[0] == size}


def test_optimizer_bench_60m_rows_and_ratios(capsys):
    assert bench_optimizer.main(["--sizes", "60m", "--methods", "adamw,subtrack++", "--repeats", "1",
                                 "--update-repeats", "1", "--threads", "1", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out, "60m")
    assert set(rows) == {"adamw", "subtrack++"}, out
    # columns: size method normal xAdamW update cost GaLore/x amortised xAdamW state-MB xAdamW
    adamw, subtrack = rows["adamw"], rows["subtrack++"]
    assert adamw[3] == adamw[8] == adamw[10] == "1.00"  # AdamW against itself
    assert adamw[6] == subtrack[6] == "-"  # no GaLore row to compare the update cost with
    # the state ratio is the quotient of the two state columns (MB, 0.1 rounding)
    assert float(subtrack[10]) == pytest.approx(float(subtrack[9]) / float(adamw[9]), abs=0.02)
    assert float(subtrack[10]) < 1.0
    # the second table: one row per distinct weight shape of a 60m layer at the paper's rank 128
    shapes = {f"{m}x{n}" for _, (m, n) in bench_optimizer.layer_shapes("60m")}
    second = out.split("subspace update alone")[1]
    assert {line.split()[1] for line in second.splitlines() if line.startswith("60m")} == shapes
    assert "(update interval 200, rank 128)" in out


def test_optimizer_bench_state_bytes_match_the_analytic_estimate():
    """State the benchmark measures for one 60m layer = pretrain/memory.py's closed form
    (AdamW: two float32 moments per weight; SubTrack++ at r = 128: basis + low-rank moments)."""
    rank = bench_optimizer.PAPER_RANK["60m"][0]
    weights = [memory.Weight(name, shape, projected=True) for name, shape in bench_optimizer.layer_shapes("60m")]
    for method in ("adamw", "subtrack++"):
        row = bench_optimizer.bench_size("60m", method, repeats=1, update_repeats=1, device=torch.device("cpu"))
        parts = [memory.state_bytes(w, method, None if method == "adamw" else rank, 32, 4) for w in weights]
        expected = sum(v for p in parts for k, v in p.items() if k in ("adamw", "basis", "moments"))
        assert row["state"] == expected, (method, row["state"], expected)
        assert row["update"] >= 0 and row["normal"] > 0 and row["interval"] == 200


# ---------------------------------------------------------------------------------------------
# comm
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comm_results(tmp_path_factory):
    """All four setups, nano model, vocabulary 512, 2 gloo ranks, 1 timed step, no warm-up."""
    path = tmp_path_factory.mktemp("comm") / "comm.json"
    argv = ["--model", "nano", "--vocab-size", "512", "--world-size", "2", "--batch-size", "1", "--seq-len", "16",
            "--steps", "1", "--warmup", "0", "--rank", "8", "--update-interval", "100", "--json", str(path),
            "--start-method", "fork"]
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert comm.main(argv) == 0
    data = json.loads(path.read_text())
    return data, printed.getvalue()


def test_comm_bench_table_has_every_setup_with_ratios_to_ddp(comm_results):
    data, out = comm_results
    results = {r["setup"]: r for r in data["results"]}
    assert list(results) == list(comm.SETUPS)
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
             line.split()[0] in comm.SETUPS}
    assert set(lines) == set(comm.SETUPS), out
    # columns: setup sent-MB x step-ms x state-MB x; the first row is the baseline
    assert lines["replicate-adamw"][2] == lines["replicate-adamw"][4] == lines["replicate-adamw"][6] == "1.00"
    base = results["replicate-adamw"]
    for setup, r in results.items():
        assert float(lines[setup][2]) == pytest.approx(r["sent_per_rank"] / base["sent_per_rank"], abs=0.006)
        assert float(lines[setup][6]) == pytest.approx(
            max(r["state_bytes_per_rank"]) / max(base["state_bytes_per_rank"]), abs=0.006)


def test_comm_bench_sharded_state_is_half_of_ddp_per_rank(comm_results):
    data, _ = comm_results
    results = {r["setup"]: r for r in data["results"]}
    params = results["replicate-adamw"]["params"]
    ddp_state = results["replicate-adamw"]["state_bytes_per_rank"]
    # every rank: two float32 moments per weight (plus a float32 step counter per tensor)
    assert ddp_state[0] == ddp_state[1] == pytest.approx(2 * 4 * params, rel=1e-3)
    for setup in ("ddp+sharded-adamw", "zero-adamw"):
        per_rank = results[setup]["state_bytes_per_rank"]
        assert sum(per_rank) == pytest.approx(ddp_state[0], rel=0.01)  # sharding keeps the total
        assert max(per_rank) == pytest.approx(ddp_state[0] / 2, rel=0.10)
    low_rank = results["zero-subtrack++"]["state_bytes_per_rank"]
    assert max(low_rank) < max(results["zero-adamw"]["state_bytes_per_rank"])


def test_comm_bench_bytes_match_ring_volumes(comm_results):
    """DDP all-reduces every gradient once (2 (N-1)/N x S sent per rank); ZeRO-2 reduce-scatters
    and all-gathers the same S (padded to the world size): the same volume within padding; DDP
    plus a sharded step adds an all-gather (3x)."""
    data, _ = comm_results
    results = {r["setup"]: r for r in data["results"]}
    grad_bytes = 4 * results["replicate-adamw"]["params"]
    ddp = results["replicate-adamw"]["sent_per_rank_bytes"]
    assert set(ddp) == {"all_reduce"}
    assert ddp["all_reduce"] == pytest.approx(2 * (2 - 1) / 2 * grad_bytes, rel=1e-3)
    for setup in ("zero-adamw", "zero-subtrack++"):
        sent = results[setup]["sent_per_rank_bytes"]
        assert sent["reduce_scatter"] == sent["all_gather"]
        assert sent["reduce_scatter"] + sent["all_gather"] == pytest.approx(ddp["all_reduce"], rel=0.01)
        # what all-reduce is left carries norms for clipping (a few floats), not the gradients
        assert sent.get("all_reduce", 0) <= 1e-3 * grad_bytes
    mixed = results["ddp+sharded-adamw"]
    assert mixed["sent_per_rank"] == pytest.approx(1.5 * results["replicate-adamw"]["sent_per_rank"], rel=0.01)


def test_comm_bench_refuses_unknown_setup(capsys):
    assert comm.main(["--setups", "replicate-adamw,zero3"]) == 2
    assert "zero3" in capsys.readouterr().err
