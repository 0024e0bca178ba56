"""Benchmarks: `python -m pretrain.bench {optimizer,comm,convergence,memory} [options]`.

Each sub-command lives in its own module (pretrain/bench/<name>.py) exposing `main(argv)`;
figures are reported side by side with their baseline, as ratios, in one run.
"""
import importlib
import sys

COMMANDS = {
    "optimizer": "step and subspace-update time, optimizer-state bytes: AdamW vs GaLore vs Fira vs SubTrack++",
    "comm": "bytes moved and step time per step: DDP+AdamW vs sharded AdamW vs sharded SubTrack++",
    "convergence": "eval loss side by side: each method at its best lr from a grid, same model, data and seeds",
    "memory": "analytic memory breakdown (and measured peak on a GPU) for a model size and optimizer",
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:10s} {text}" for name, text in COMMANDS.items())
        print(f"usage: python -m pretrain.bench COMMAND [options]\n\ncommands:\n{lines}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"pretrain.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
