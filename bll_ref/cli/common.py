"""What the ``bll-ref`` sub-commands share: the --data option, count checks, the help format."""
from __future__ import annotations

import argparse

__all__ = ["add_data_option", "check_count", "Help", "DATA_CHOICES"]

DATA_CHOICES = ("auto", "fashion-mnist", "synthetic")
_DATA_HELP = ("auto: Fashion-MNIST from $BLL_DATA (an error if incomplete) or /usr/share/datasets/fashion-mnist "
              "when present, else the synthetic stand-in (said in the log); fashion-mnist: required; "
              "synthetic: the synthetic task")


def add_data_option(p, purpose):
    """The one --data option: ``purpose`` (e.g. "test data") for commands that read a checkpoint,
    whose ``auto`` means the data the checkpoint was trained on; None for train."""
    text = _DATA_HELP if purpose is None else f"{purpose}; auto: what the checkpoint was trained on (recorded in it)"
    p.add_argument("--data", choices=DATA_CHOICES, default="auto", help=text)


def check_count(name, value, low=1):
    """ValueError unless ``value`` (an option --name) is None or a whole number >= low."""
    if value is not None and value < low:
        raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already states the default or there is none."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in h:
            return h
        return super()._get_help_string(action)
