"""Argument parsing and error reporting shared by the training stages."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from common import dist
from common.config import Config, ConfigError, help_text, load_config
from common.trainer import TrainingError
from preference_data.records import DataError


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{stage}", description=description,
                                     epilog=help_text(stage), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(stage: str, description: str, run: Callable[[Config], dict], argv: list[str] | None = None) -> int:
    """Parse, validate (before any model is loaded), run; user errors exit 2 with one clear line."""
    args = stage_parser(stage, description).parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg)
        dist.teardown()
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"{stage}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:  # training itself failed (e.g. a non-finite loss): the message says what to do
        print(f"{stage}: training stopped: {exc}", file=sys.stderr)
        return 1
    return 0
