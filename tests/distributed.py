"""Start N gloo processes on a free port and collect what each returns.

Two entry points, in the spirit of OLMo-core's `testing/distributed.py`:

- `run_distributed(fn, world_size, *args)`: spawns `world_size` Python processes, each
  initialises a gloo process group, calls `fn(*args, **kwargs)` and sends back its (picklable)
  result. Returns `[result_rank0, result_rank1, ...]`; any exception in any rank is re-raised
  here with that rank's traceback.
- `run_module(module, argv, world_size)`: runs `python -m module *argv` in `world_size`
  subprocesses with the environment torchrun would set (`torchrun_env`: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT); returns the finished `subprocess.CompletedProcess` per rank.
  `start_ranks(argv, world_size)` starts them and leaves the waiting to the caller (a test that
  signals a rank, or whose rank hangs).

Both kill what they started when the timeout expires and then fail the test.
"""
import io
import os
import queue
import socket
import subprocess
import sys
import traceback

import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port free right now on localhost (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env(rank: int, world_size: int, port: int) -> dict:
    """The variables torchrun sets for `rank` of `world_size` on one node (LAUNCHER_KEYS)."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }


def start_ranks(argv: list[str], world_size: int = 2, env: dict | None = None,
                cwd: str = ROOT) -> list[subprocess.Popen]:
    """Start `python *argv` as `world_size` ranks with torchrun's environment on a free port (stdout and
    stderr piped, text); the caller waits for them and kills what is left."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        # faulthandler: a rank that aborts (SIGABRT in a C++ thread) prints its Python stacks
        child_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
                     **(env or {}), **torchrun_env(rank, world_size, port)}
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=cwd, env=child_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _worker(rank, world_size, port, env, fn, args, kwargs, results):
    os.environ.update(env)
    os.environ.update(torchrun_env(rank, world_size, port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share the machine's few cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(*args, **kwargs)
        # As bytes: tensors pickled by torch.multiprocessing would point at this process's shared
        # memory, which is gone once it exits.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 120.0, env: dict | None = None,
                    **kwargs) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results by rank.

    `fn` must be importable by name (a module-level function) since processes are spawned.
    `env` is set in each child before torch is imported there (e.g. DS_ACCELERATOR=cpu).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, dict(env or {}), fn, args, kwargs, results),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    collected, errors = {}, []
    try:
        while len(collected) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected) - {e[0] for e in errors})
                raise TimeoutError(
                    f"ranks {missing} of {world_size} gave no result within {timeout:.0f} s"
                    + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors)) from None
            if ok:
                import torch

                collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append((rank, value))
                timeout = 5.0  # the other ranks fail soon too, or hang in a collective
    except TimeoutError:
        if not errors:
            raise
    finally:
        for p in procs:
            p.join(timeout=0 if errors else 10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("".join(f"\n--- rank {r} failed ---\n{tb}" for r, tb in errors))
    return [collected[r] for r in range(world_size)]


def run_module(module: str, argv: list[str], world_size: int = 2, timeout: float = 120.0,
               env: dict | None = None, cwd: str = ROOT) -> list[subprocess.CompletedProcess]:
    """Run `python -m module *argv` as `world_size` ranks with torchrun's environment variables."""
    procs = start_ranks(["-m", module, *argv], world_size, env=env, cwd=cwd)
    done = []
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"python -m {module} on {world_size} ranks ran past {timeout:.0f} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def check_ok(done: list[subprocess.CompletedProcess]) -> list[subprocess.CompletedProcess]:
    """Raise with every rank's output if any rank of `run_module` failed."""
    if any(d.returncode != 0 for d in done):
        raise RuntimeError("".join(f"\n--- rank {r} exit {d.returncode} ---\n{d.stdout}\n{d.stderr}"
                                   for r, d in enumerate(done)))
    return done

