"""The ``loongforge`` command line.

    loongforge run [CONFIG] [key=value ...] [--nproc-per-node N ...]   train
    loongforge plugins | models                                         what is installed
    loongforge config show [CONFIG] [key=value ...]                     the composed config
    loongforge data preprocess ...                                      jsonl/parquet -> indexed
    loongforge generate CHECKPOINT --prompt TEXT                        sample from a checkpoint
    loongforge convert NAME ARGS...                                     a registered checkpoint converter
    loongforge data convert IN OUT --to messages|sharegpt|alpaca        conversation data formats
    loongforge export-lora CKPT OUT [--merge]                           LoRA adapter in PEFT format
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = "default"
#: torchrun flags ``loongforge run`` passes through to torch's elastic launcher
LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--max-restarts", "--shutdown-timeout")


RUN_EPILOG = """\
launching:
  --nproc-per-node N   start N processes on this machine (torchrun); further torchrun flags:
                       --nnodes, --node-rank, --master-addr, --master-port, --rdzv-*, --shutdown-timeout

examples:
  loongforge run train.steps=50                               the default config, 50 steps
  loongforge run sft_demo model.pretrained=/models/Qwen3-0.6B tokenizer.path=/models/Qwen3-0.6B \\
      --nproc-per-node 8                                      fine-tune HF weights on 8 GPUs

exit codes: 0 done, 1 a worker failed, 2 a user error (one line on stderr), 75 stopped by
SIGTERM/SIGINT after saving a checkpoint (the same command resumes: checkpoint.load=auto), 128+N
killed by a second signal N.
"""


class CliError(Exception):
    """A user error: printed without a traceback."""


def _plugins():
    from loongforge.plugins import get_plugin_manager

    return get_plugin_manager()


def _report_failures(plugins) -> None:
    for f in plugins.failures:
        print(f"warning: plugin {f.name!r} ({f.distribution} {f.version}) was not loaded: {f.error}",
              file=sys.stderr)


def cmd_plugins(args) -> int:
    from rich.console import Console
    from rich.table import Table

    plugins = _plugins()
    table = Table("plugin", "distribution", "version", "hooks / error")
    for p in plugins.plugins:
        table.add_row(p.name, p.distribution, p.version,
                      f"[red]REFUSED: {p.error}[/red]" if p.error else ", ".join(h.removeprefix("loongforge_") for h in p.hooks) or "(none yet)")
    Console(width=200).print(table)
    return 1 if plugins.failures else 0


def cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from loongforge.config.compose import list_configs

    plugins = _plugins()
    registry = plugins.registry()
    table = Table("family", "plugin", "HF model_type", "status", "sizes (test-only sizes: *_tiny)")
    for name, rec in registry.models.items():
        rows = []
        for group in rec.config_groups or (f"models/{name}",):
            names = list_configs(registry, group)
            real = [n for n in names if not n.endswith("_tiny")]
            tests = [n for n in names if n.endswith("_tiny")]
            rows.append(f"/{group}: {', '.join(real) or '-'}" + (f"  (test only: {', '.join(tests)})" if tests else ""))
        status = "supported" if rec.supported else "[yellow]UNSUPPORTED: no reference implementation (parity not proven)[/yellow]"
        table.add_row(name, registry.owners[("models", name)], ", ".join(rec.hf_model_types), status,
                      "\n".join(rows) or "-")
    Console(width=220).print(table)
    _report_failures(plugins)
    return 0


def _compose(args):
    from loongforge.config import compose_config

    return compose_config(args.config, args.overrides)


def cmd_config_show(args) -> int:
    from omegaconf import OmegaConf

    cfg = _compose(args)
    print(OmegaConf.to_yaml(cfg), end="")
    if cfg.backend is None:  # a YAML comment: the output stays a loadable config
        from loongforge.trainer.runtime import select_backend

        backend = select_backend(_plugins(), None)
        print(f"# backend: null resolves to {backend.name!r} on this machine "
              "(the available backend with the highest priority)")
    return 0


def _versions() -> str:
    """Every installed LoongForge distribution with its version."""
    from importlib.metadata import distributions

    found = sorted({(d.metadata["Name"], d.version) for d in distributions()
                    if (d.metadata["Name"] or "").lower().replace("_", "-").startswith("loongforge")})
    return "\n".join(f"{name} {version}" for name, version in found) or "loongforge (no distribution metadata)"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print every installed LoongForge package's version")

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())
        parser.exit()


def _launch(args, launch: list[str]) -> int:
    """Re-run this command under torch's elastic launcher, one process per rank."""
    from torch.distributed.run import main as torchrun

    from loongforge.preflight import PREFLIGHT_ENV

    child = ["--no-python", sys.executable, "-m", "loongforge.cli", "run", args.config, *args.overrides]
    os.environ[PREFLIGHT_ENV] = "done"  # checked once, here; the workers inherit it
    if not any(flag.split("=")[0] in ("--nnodes", "--master-addr", "--master-port") for flag in launch):
        launch = ["--standalone", *launch]  # one node: rendezvous on a free port, not a fixed 29500
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from loongforge.trainer.compat import checkpoint_root
    from loongforge.trainer.signals import EXIT_INTERRUPTED

    latest = checkpoint_root(_compose(args)) / "latest"
    before = latest.read_text() if latest.is_file() else None
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun([*launch, *child])
    except ChildFailedError as exc:  # the workers printed their errors; no launcher traceback on top
        ranks = ", ".join(f"rank {f.global_rank} (exit code {f.exitcode})" for f in exc.failures.values())
        print(f"error: worker processes failed: {ranks}", file=sys.stderr)
        return 1
    except SignalException as exc:  # torchrun forwarded it to the workers and waited for them
        after = latest.read_text() if latest.is_file() else None
        if after is not None and after != before:
            return EXIT_INTERRUPTED  # the workers saved (rank 0 printed the line)
        print(f"stopped by {exc.sigval.name}; no new checkpoint was saved", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


def cmd_run(args, launch: list[str]) -> int:
    from loongforge import preflight
    from loongforge.plugins import lookup

    plugins = _plugins()
    if not preflight.done():
        _report_failures(plugins)
    cfg = _compose(args)
    lookup(plugins.registry().tasks, cfg.task, "task (config key 'task')", plugins.failures)
    from loongforge.console import quiet_console  # library warnings/logs -> <output_dir>/run.log

    # from the preflight on (it imports the model's libraries); the log file only once it passed
    with quiet_console(cfg.output_dir, deferred=True) as log:
        if not preflight.done():  # before any worker starts: a user error is printed once
            world = preflight.world_size_of(launch) if launch else int(os.environ.get("WORLD_SIZE", 1))
            cfg = preflight.preflight(cfg, plugins, world)
        log.open()
        if launch and "RANK" not in os.environ:
            return _launch(args, launch)
        if "RANK" in os.environ:  # a torchrun worker: die with the launcher, also when it is SIGKILLed
            from loongforge.trainer.signals import die_with_parent

            die_with_parent()
        from loongforge.trainer.loop import run

        run(cfg, plugins)
    return 0


def cmd_generate(args) -> int:
    from loongforge.generate import generate

    print(generate(args.checkpoint, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed, output=args.output,
                   num_steps=args.steps))
    return 0


def cmd_data_preprocess(args) -> int:
    from loongforge.data.preprocess import run_preprocess

    print(run_preprocess(args).summary())
    return 0


def cmd_data_convert(args) -> int:
    from loongforge.data.convert import convert

    n = convert(args.input, args.output, args.to, source_format=args.source_format)
    print(f"wrote {n} conversations to {args.output} ({args.to})")
    return 0


def cmd_export_lora(args) -> int:
    from loongforge.peft.export import export_lora

    out = export_lora(args.checkpoint, args.output, merge=args.merge)
    print(f"wrote {'merged HF weights' if args.merge else 'PEFT adapter'} to {out}")
    return 0


def cmd_convert(args) -> int:
    from loongforge.plugins import lookup
    from loongforge.registry import load_object

    plugins = _plugins()
    converters = plugins.registry().converters
    if args.name is None:
        for name, rec in converters.items():
            print(f"{name:16} {rec.description}")
        if not converters:
            print("no converters installed (pip install 'loongforge[ckpt]')")
        return 0
    converter = lookup(converters, args.name, "converter (install loongforge-ckpt for hf-to-mcore/mcore-to-hf)",
                       plugins.failures)
    return int(load_object(converter.run)(args.args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loongforge", description="LoongForge training framework")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p):
        p.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                       help="a YAML file, or a config name from the plugins' config directories")
        p.add_argument("overrides", nargs="*", help="key=value overrides (Hydra syntax)")

    run = sub.add_parser(
        "run", help="compose a config and run its task (train)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Compose CONFIG (default: {DEFAULT_CONFIG!r}, a small Qwen3-style model on the shipped "
                    "tiny-stories corpus) with key=value overrides and run its task.",
        epilog=RUN_EPILOG)
    config_args(run)
    run.set_defaults(func=cmd_run)
    sub.add_parser("plugins", help="installed plugins, versions and hooks").set_defaults(func=cmd_plugins)
    sub.add_parser("models", help="registered model families and their configs").set_defaults(func=cmd_models)
    config = sub.add_parser("config", help="config tools").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the composed config as YAML")
    config_args(show)
    show.set_defaults(func=cmd_config_show)

    gen = sub.add_parser("generate", help="sample from a trained checkpoint (text, a video, an action chunk: "
                                          "what the checkpoint's task generates)")
    gen.add_argument("checkpoint", help="a checkpoint directory (or the run's checkpoints directory)")
    gen.add_argument("--prompt", help="the text to continue or condition on")
    gen.add_argument("--output", help="where a task that writes a file (a video, actions) writes it")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps of a diffusion / flow-matching task")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    convert = sub.add_parser("convert", help="convert checkpoints (converters come from plugins)")
    convert.add_argument("name", nargs="?", help="converter name, e.g. hf-to-mcore; omit to list them")
    convert.add_argument("args", nargs=argparse.REMAINDER, help="the converter's own arguments")
    convert.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    pre = data.add_parser("preprocess", help="tokenize jsonl/parquet into megatron-core's indexed format")
    from loongforge.data.preprocess import add_preprocess_arguments

    add_preprocess_arguments(pre)
    pre.set_defaults(func=cmd_data_preprocess)
    conv = data.add_parser("convert", help="convert conversation data between messages/sharegpt/alpaca")
    conv.add_argument("input", help="a .jsonl/.json/.parquet file")
    conv.add_argument("output", help="the output file (.jsonl or .parquet)")
    conv.add_argument("--to", required=True, choices=["messages", "sharegpt", "alpaca"])
    conv.add_argument("--from", dest="source_format", default="auto",
                      choices=["auto", "messages", "sharegpt", "alpaca"])
    conv.set_defaults(func=cmd_data_convert)

    exp = sub.add_parser("export-lora", help="write a LoRA run's adapter in PEFT format (or merged HF weights)")
    exp.add_argument("checkpoint", help="a checkpoint directory (or the run's checkpoints directory)")
    exp.add_argument("output", help="output directory")
    exp.add_argument("--merge", action="store_true", help="merge the adapters into the base weights (HF format)")
    exp.set_defaults(func=cmd_export_lora)
    return parser


def _split_launch_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate torchrun's flags (``--nproc-per-node 2`` or ``--nproc-per-node=2``) from ours."""
    ours, launch, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0].replace("_", "-")
        if name in LAUNCH_FLAGS:
            launch.append(arg)
            if "=" not in arg:
                launch.append(argv[i + 1])
                i += 1
        else:
            ours.append(arg)
        i += 1
    return ours, launch


def main(argv: list[str] | None = None) -> int:
    from loongforge.errors import LoongForgeError
    from loongforge.trainer.signals import EXIT_INTERRUPTED, Interrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    ours, launch = _split_launch_flags(argv)
    args = _parser().parse_args(ours)
    if getattr(args, "config", None) and "=" in args.config:  # `loongforge run key=value`: default config
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    try:
        if args.command == "run":
            return cmd_run(args, launch)
        return args.func(args)
    except (CliError, LoongForgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first, below)
        print("interrupted", file=sys.stderr)
        return 130
    except Interrupted as exc:  # SIGTERM/SIGINT in training: the checkpoint is saved
        if os.environ.get("RANK", "0") == "0":
            print(exc, file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
