"""The ``metarl`` command: ``metarl <subcommand> [options]``.

Subcommands import their (heavy) dependencies lazily, so ``metarl --help`` is instant and
commands that need no torch never import it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from metarl_ros.core.resources import resolve_path
    from metarl_ros.learning.config import load_train_config, run_config_text
    from metarl_ros.learning.trainer import Trainer

    config_path = resolve_path(args.config)
    overrides = [*([f"seed={args.seed}"] if args.seed is not None else []), *args.set]
    config = load_train_config(config_path, overrides)
    out = Path(args.out) if args.out else Path("runs") / config.method
    latest = out / "checkpoints" / "latest"
    if latest.exists() and not args.resume:
        print(f"error: {out} already holds a run; pass --resume to continue it or choose another "
              f"--out", file=sys.stderr)
        return 2
    trainer = Trainer(config, out, config_path=config_path, progress=not args.no_progress)
    if args.resume and trainer.resume():
        print(f"resumed {out} at iteration {trainer.iteration} "
              f"({trainer.env_steps} env steps, {trainer.updates} updates)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(run_config_text(config_path, overrides))
    stats = trainer.run(max_iterations=args.iterations, stop_after_seconds=args.max_minutes * 60
                        if args.max_minutes else None)
    print(f"done: iteration {trainer.iteration}, {trainer.env_steps} env steps, "
          f"{trainer.updates} updates; model: {out / 'model.pt'}")
    for key in sorted(k for k in stats if k.startswith("eval/")):
        print(f"  {key} = {stats[key]:.4f}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from metarl_ros.distributed.sweep import sweep_command

    return sweep_command(args)


def _eval(args: argparse.Namespace) -> int:
    from metarl_ros.distributed.episodes import choose_backend
    from metarl_ros.evaluation.evaluate import evaluate_command

    return evaluate_command(args, choose_backend(args.backend, args.workers, args.address))


def _export(args: argparse.Namespace) -> int:
    from metarl_ros.policy.onnx_export import export_model

    summary = export_model(args.model, args.out)
    print(f"exported {summary['method']} model to {args.out}: {', '.join(summary['files'])} "
          f"(opset {summary['opset']}, max |onnx - torch| = {summary['max_abs_diff']:.1e}, "
          f"max |onnx - torch| / (1 + |torch|) = {summary['max_scaled_diff']:.1e})")
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from metarl_ros.learning.offline import load_retrain_config, retrain
    from metarl_ros.policy.onnx_export import export_model

    config = load_retrain_config(args.config)
    retrain(args.bag, args.model, args.out, config, progress=not args.no_progress,
            export=export_model)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from metarl_ros.demo import demo_command

    return demo_command(args)


def _bag_repair(args: argparse.Namespace) -> int:
    from metarl_ros.recording.repair import repair_bag

    print(repair_bag(args.path, out=args.out).summary())
    return 0


def _launch(rest: list[str]) -> int:
    from metarl_ros.cli.launch import launch_command

    return launch_command(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarl", description="The metarl command: metarl <subcommand> [options].")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train a method from a YAML config")
    train.add_argument("--config", required=True, help="training YAML (config/train_*.yaml)")
    train.add_argument("--out", help="run directory (default runs/<method>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--iterations", type=int, help="stop after this many more iterations")
    train.add_argument("--max-minutes", type=float,
                       help="stop (with a checkpoint) after this long")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--seed", type=int, help="the config's seed instead (same as --set seed=N)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="change a config field, dotted for sections "
                            "(agent.kl_weight=0.001; values are YAML: 0.5, true, [64, 64]); "
                            "repeatable, validated like the file, kept in the run's config")
    train.set_defaults(func=_train)

    sweep = sub.add_parser("sweep", help="train one run per seed and --set combination as Ray "
                           "Tune trials (needs the [distributed] extra)")
    sweep.add_argument("--config", required=True, help="training YAML (config/train_*.yaml)")
    sweep.add_argument("--seeds", help="comma-separated seeds, one trial each (default: the "
                       "config's seed)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=V1[,V2...]",
                       help="a config field and its values to sweep (agent.kl_weight=0.001,0.01;"
                            " values as in metarl train --set); repeatable: every combination")
    sweep.add_argument("--out", default="runs/sweep",
                       help="sweep directory: runs/<trial>/, results.json/.csv, Tune state "
                            "(default runs/sweep)")
    sweep.add_argument("--address", help="join this Ray cluster (auto, host:port) instead of "
                       "starting Ray on this machine")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep in --out (finished trials are not redone)")
    sweep.set_defaults(func=_sweep)

    evaluate = sub.add_parser(
        "eval", help="evaluate methods on fault suites (or a split) with mid-episode faults")
    evaluate.add_argument("--model", required=True, nargs="+", metavar="DIR",
                          help="model directory with <method>/model.pt per method; several "
                               "= several training runs (seeds), reported across runs; a "
                               "single model.pt (or its folder) counts as a run of its method")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--suite", help="shipped fault suite(s) (sim/suites/): NAME[,NAME] "
                        "or all")
    source.add_argument("--tasks", metavar="FILE", help="a fault suite file of your own "
                        "(same schema as sim/suites/*.yaml)")
    source.add_argument("--split", choices=["train", "heldout", "ood"],
                        help="a split of the training task file (default heldout when no "
                             "--suite/--tasks)")
    evaluate.add_argument("--draw", choices=["validation", "report", "both"],
                          default="validation",
                          help="suite draw: validation (make every choice here; default), "
                               "report (the published numbers), both")
    evaluate.add_argument("--tasks-per-condition", type=int,
                          help="evaluate only the first N tasks of each suite condition")
    evaluate.add_argument("--episodes", type=int, default=50, help="split episodes")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="split episode seed; bootstrap seed")
    evaluate.add_argument("--methods", help="comma-separated subset of methods")
    evaluate.add_argument("--workers", type=int, default=1,
                          help="processes running episodes (results do not depend on it)")
    evaluate.add_argument("--backend", choices=["auto", "process", "ray"], default="auto",
                          help="what runs the episodes: Ray tasks (ray; the [distributed] "
                               "extra), a process pool (process), or auto: Ray with --address, "
                               "else the pool (as fast on one machine)")
    evaluate.add_argument("--address", help="run the episodes on this Ray cluster (auto, "
                          "host:port); --workers tasks at a time")
    evaluate.add_argument("--json", required=True, help="write results here")
    evaluate.add_argument("--plot", help="PNG (one suite draw) or folder for the figures")
    evaluate.add_argument("--timings", help="write the wall times of each part here (JSON)")
    evaluate.set_defaults(func=_eval)

    export = sub.add_parser("export", help="ONNX graphs + contract, parity-checked against torch")
    export.add_argument("--model", required=True, help="model.pt (or its directory)")
    export.add_argument("--out", required=True,
                        help="new directory for the ONNX files, or a previous export to replace")
    export.set_defaults(func=_export)

    retrain = sub.add_parser("retrain", help="fine-tune a model offline from rosbag2 bags "
                             "(TD3+BC), evaluate before/after, write model.pt + ONNX")
    retrain.add_argument("--bag", required=True, nargs="+", metavar="DIR",
                         help="rosbag2 directories (recorder_node or ros2 bag record)")
    retrain.add_argument("--model", required=True, help="input model.pt (or its directory)")
    retrain.add_argument("--out", required=True,
                         help="new (or empty) directory for model.pt, onnx/, eval.json, "
                              "retrain.json")
    retrain.add_argument("--config", help="retrain YAML (topics, alignment, training, "
                         "evaluation; default: built-in defaults, see config/retrain.yaml)")
    retrain.add_argument("--no-progress", action="store_true", help="no progress bars")
    retrain.set_defaults(func=_retrain)

    demo = sub.add_parser("demo", help="the main job: the adapt_sim node graph through the "
                          "fault scenario on the shipped model, adaptation off and on")
    demo.add_argument("--out", default="out/demo",
                      help="directory for summary.json and tracking_error.png (default out/demo)")
    demo.add_argument("--model", help="PEARL model.pt or its directory (default: adapt_sim's "
                      "model argument, models/pearl/model.pt)")
    demo.add_argument("--scenario", help="fault scenario YAML (default: adapt_sim's scenario "
                      "argument, config/scenarios/default.yaml)")
    demo.add_argument("--duration", type=float,
                      help="simulated seconds per run (default: the scenario's duration_s)")
    demo.add_argument("--real-time-factor", type=float, default=0.0,
                      help="sim_node pacing: 0 = lockstep, as fast as possible (default); "
                           "1 = real time")
    demo.add_argument("--no-ros", action="store_true",
                      help="run the Gymnasium env directly instead of the node graph (no DDS; "
                           "adds a frozen-latent control)")
    demo.add_argument("--verbose", action="store_true", help="show the nodes' INFO logs")
    demo.set_defaults(func=_demo)

    bag = sub.add_parser("bag", help="rosbag2 bag tools").add_subparsers(dest="bag_command",
                                                                         required=True)
    repair = bag.add_parser("repair", help="make a bag of a killed recording (no metadata.yaml, "
                            "cut data file): recovers every complete message")
    repair.add_argument("path", help="bag directory (or its .mcap/.db3 file)")
    repair.add_argument("--out", help="write the repaired bag here (a new path) and leave the "
                        "original as it is; default: in place, the original kept as "
                        "<path>.orig")
    repair.set_defaults(func=_bag_repair)

    sub.add_parser("launch", help="start a node graph without ros2 launch (metarl launch -h)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "launch":
        return _launch(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from metarl_ros.core.errors import MetarlError

    try:
        return args.func(args)
    except MetarlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
