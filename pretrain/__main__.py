"""`python -m pretrain --config configs/X.yaml [--set section.key=value ...] [--resume auto|PATH] [--deepspeed DS.json]`.

Also the `pretrain` console script. Works under torchrun, the DeepSpeed launcher (which adds
`--local_rank=N`) and SLURM srun. Exit status: 0 done, or stopped by SIGTERM / SIGUSR1 after saving
(the requeued job resumes); 130 stopped by Ctrl-C (SIGINT) after saving; 2 a user error (config, a used
run dir, a refused resume); 1 a checkpoint that could not be written; 3 the run diverged (the divergence
guard's one line names the checkpoint to resume from).

Bad user input (data.errors.UserError: a config error, a refused resume, a used run dir, a bad
tokenizer or data line, a checkpoint that would run code) is one line on stderr, printed by rank 0
alone when every rank meets it alike. `--check` validates the config (and the files it names) in
this one process and exits: the launch scripts run it before they start the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pre-train a Llama model (see README.md).")
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 optim.lr=3e-4")
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest complete checkpoint of the run, if any) or a checkpoint directory; "
                             "same as --set checkpoint.resume=...")
    parser.add_argument("--restart", action="store_true",
                        help="start over in a run dir an earlier run used: its contents are moved aside to "
                             "<run_dir>.old-<time> (without it such a run dir is refused; --resume auto continues it)")
    parser.add_argument("--deepspeed", default=None, metavar="DS_CONFIG",
                        help="run under the DeepSpeed engine with this JSON (configs/deepspeed/zero0.json); "
                             "same as --set train.deepspeed=...")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed
    parser.add_argument("--summary-json", default=None, help="write the run summary to this JSON file")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the files it names, print one line and exit (0: it can run, "
                             "2: it cannot); launch/ scripts run this once before starting the ranks")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    overrides = [item for group in args.overrides for item in group]
    if args.deepspeed is not None:
        overrides.append(f"train.deepspeed={args.deepspeed}")
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    elif args.restart:  # starting over outranks a recipe's `checkpoint.resume: auto` (an explicit --resume does not)
        overrides.append("checkpoint.resume=null")

    from data.errors import UserError
    from pretrain.config import check_paths, load_config
    from pretrain.distributed import env_rank, env_world_size

    try:
        cfg = load_config(args.config, overrides)
        check_paths(cfg)  # missing tokenizer / data, unwritable run directory: one line, not a traceback
    except UserError as e:
        return user_error(f"config error: {e}", e)
    if args.check:
        print(f"pretrain: config {args.config} is valid for {env_world_size()} process(es); run dir {cfg.run_dir}")
        return 0

    from pretrain.checkpoint import CheckpointWriteError
    from pretrain.distributed import is_collective_failure
    from pretrain.train import train

    try:
        summary = train(cfg, restart=args.restart)
    except KeyboardInterrupt:  # Ctrl-C during set-up (before the loop saves on it), or a second Ctrl-C
        print("pretrain: interrupted (Ctrl-C); nothing more was saved", file=sys.stderr, flush=True)
        return 130
    except UserError as e:  # a refused resume, a locked or used run dir, a bad tokenizer or data line, ...
        return user_error(str(e), e)
    except CheckpointWriteError as e:  # disk full: the previous checkpoint is intact
        print(f"pretrain: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a peer died or hung past train.collective_timeout_s
        if not is_collective_failure(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"pretrain: rank {env_rank()}: a collective failed ({e.__class__.__name__}: {first}); a peer process "
              f"died or hung (train.collective_timeout_s = {cfg.train.collective_timeout_s:g}); see the other ranks' "
              "output, then resume with --resume auto", file=sys.stderr)
        return 1
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    if summary["stopped_by"] == "diverged":  # train() printed the one line
        return 3
    if summary["stopped_by"] not in (None, "steps_per_run"):
        print(f"pretrain: stopped by {summary['stopped_by']} at step {summary['step']}; checkpoint "
              f"{summary['checkpoint']} (resume with --resume auto)", flush=True)
    return 130 if summary["stopped_by"] == "SIGINT" else 0


def user_error(message: str, error) -> int:
    """Print `message` as one line (rank 0 alone, unless only some ranks may meet `error`); exit status 2."""
    from pretrain.distributed import env_rank

    if env_rank() == 0 or not error.every_rank:
        print(f"pretrain: {message}".replace("\n", " "), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
