"""Command line: ``mtl train``, ``mtl compare``, ``mtl list`` and the tools in ``TOOLS``.

Configs are composed with Hydra's compose API from the repository's ``conf/``
(``$MTL_CONF_DIR`` overrides it), so every argument after the sub-command is a
Hydra override::

    mtl train experiment=census_home trainer.max_epochs=1 model.num_shared_experts=2
    mtl compare models=[mmoe,home] data=census_income seeds=3 trainer.max_epochs=2
    mtl list

Configuration and data errors (unknown names, bad files, bad columns) print one
``error: ...`` line and exit with status 2; ``MTL_DEBUG=1`` shows the traceback.
A run that diverges (a NaN or infinite loss or weight, see
:mod:`mtl.training.finite_guard`) prints one ``error: ...`` line naming the step and
the likely cause, writes no ``metrics.json``, and exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1

# Sub-commands with their own argument parser: name -> ("module:function", help).
# The function takes the remaining arguments and returns the exit status; it is
# imported only when its sub-command runs.
TOOLS: dict[str, tuple[str, str]] = {
    "prepare": (
        "mtl.data.shards.prepare:main",
        "encode a data=table config into Parquet shards for data=shards (data larger than memory)",
    ),
    "generate": (
        "mtl.models.lm.generate_cli:main",
        "sample text from an LM checkpoint or a transformers MoE checkpoint directory",
    ),
    "merge": ("mtl.training.merge:main", "average same-architecture checkpoints (LM-Cocktail)"),
}

_EPILOG = """examples:
  mtl train                                        # MMoE on synthetic CTR data, CPU
  mtl train model=home data=census_income trainer.max_epochs=3
  mtl train experiment=census_home output_dir=runs/census_home
  mtl train output_dir=runs/census_home resume=last trainer.max_epochs=6
  mtl compare models=[mmoe,home] data=census_income seeds=3 trainer.max_epochs=2
  mtl train --print-config model=ple               # show the composed config and exit
  mtl list                                         # models, data, experiments, trainers
  mtl prepare data=table data.path=big.parquet data.labels=[click] data.categorical=[item] out=shards/big
  mtl generate runs/lm_mixtral/<run>/checkpoints/last.ckpt --prompt "ROMEO:"
  mtl merge a.ckpt b.ckpt --weights 0.5 0.5 --out merged.ckpt

Overrides are Hydra syntax: key=value, group=choice, +new_key=value, ++key=value.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl",
        description="Multi-task learning with mixtures of experts: train and compare MMoE, PLE, HoME, ...",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(["train", "compare", "list", *TOOLS]) + "}"
    )
    for name, help_text in (
        ("train", "train one model (conf/train.yaml); writes metrics.json, checkpoints, logs"),
        (
            "compare",
            "train models x seeds on one split (conf/compare.yaml); writes report.md, results.json, plots",
        ),
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--print-config", action="store_true", help="print the composed config and exit"
        )
        p.add_argument(
            "overrides", nargs="*", help="Hydra overrides, e.g. model=home trainer.max_epochs=2"
        )
    sub.add_parser("list", help="list available models, data, experiments and trainers")
    for name, (_, help_text) in TOOLS.items():
        # listed here for ``mtl --help``; main() hands a tool its arguments before parsing
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_list() -> int:
    """Print the config choices found in ``conf/``."""
    from mtl.training.config import GROUPS, available, conf_dir

    root = conf_dir()
    print(f"configs in {root}")
    for group in GROUPS:
        names = available(group, root)
        print(f"  {group + ':':13}{', '.join(names) if names else '(none)'}")
    print(
        "select with e.g. `mtl train model=home data=census_income` or `mtl train experiment=census_home`"
    )
    return 0


def cmd_train(overrides: Sequence[str], print_config: bool) -> int:
    """Compose ``train``, run it, print the summary."""
    from mtl.training.config import compose_config, to_yaml, unset_keys

    if print_config:
        # A config that still has keys to set (experiment=lm_lora) is shown as composed.
        cfg = compose_config("train", overrides, resolve=False)
        missing = unset_keys(cfg)
        if not missing:
            cfg = compose_config("train", overrides)
        print(to_yaml(cfg))
        if missing:
            print(f"# to set before a run: {', '.join(missing)}")
        return 0
    cfg = compose_config("train", overrides)
    from mtl.training.ranks import is_launch_rank_zero
    from mtl.training.results import summary
    from mtl.training.train import train

    result = train(cfg)
    if is_launch_rank_zero():  # a DDP run prints its summary once
        print(f"\n{summary(result)}")
    return 0


def cmd_compare(overrides: Sequence[str], print_config: bool) -> int:
    """Run ``mtl compare``: every model x seed, then the report."""
    from mtl.training.compare import compare_config, run_compare

    if print_config:
        from mtl.training.config import to_yaml

        print(to_yaml(compare_config(overrides)))
        model_overrides = [o for o in overrides if o.lstrip("+~").startswith("model.")]
        if model_overrides:
            print(f"# applied to each model whose config has the key: {' '.join(model_overrides)}")
        return 0
    run_compare(overrides)
    return 0


def cmd_tool(name: str, argv: Sequence[str]) -> int:
    """Run the tool registered as ``name`` in ``TOOLS`` with its own arguments."""
    import importlib

    module_name, function_name = TOOLS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(list(argv)))


def _quoted(value: str) -> str:
    """``value`` with its names that hold spaces or non-ASCII characters in double quotes."""

    def quote(name: str) -> str:
        name = name.strip()
        return f'"{name}"' if (" " in name or not name.isascii()) else name

    if value.startswith("[") and value.endswith("]"):
        return "[" + ",".join(quote(v) for v in value[1:-1].split(",")) + "]"
    return quote(value)


def _override_hint(message: str, argv: Sequence[str]) -> str:
    """A fix to append to Hydra's override parse error when an override holds a space or a
    non-ASCII character (Hydra's grammar takes unquoted names of ASCII letters only)."""
    if "LexerNoViableAltException" not in message and "override_grammar" not in message:
        return ""
    suspect = [a for a in argv if "=" in a and (" " in a or not a.isascii())]
    if not suspect:
        return ""
    key, value = suspect[0].split("=", 1)
    example = (
        f"{key}={_quoted(value)}"
        if not any(q in value for q in "\"'")
        else 'data.categorical=[user_id,"artículo"]'
    )
    return f"; quote names with spaces or non-ASCII characters: '{example}'"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] in TOOLS:
        # A tool parses its own arguments (``mtl generate --help`` included): argparse's
        # REMAINDER would refuse a leading option.
        args = argparse.Namespace(command=argv[0], args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging()
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from mtl.training.finite_guard import NonFiniteError

    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "train":
            return cmd_train(args.overrides, args.print_config)
        if args.command in TOOLS:
            return cmd_tool(args.command, args.args)
        return cmd_compare(args.overrides, args.print_config)
    except NonFiniteError as exc:
        # The input was valid but the run diverged: a failed run, not a usage error.
        if os.environ.get("MTL_DEBUG"):
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except (ValueError, FileNotFoundError, MisconfigurationException) as exc:
        # Config and data validation errors (and Lightning's, e.g. a monitor key that is
        # never logged): the message is the useful part.
        if os.environ.get("MTL_DEBUG"):
            raise
        message = " ".join(str(exc).split()) + _override_hint(str(exc), argv)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
