"""``bll-ref`` command line: train, eval, demo, report, doctor, finetune-q, export, verify, nir,
c-header, firmware, firmware-learn, qonnx. Parsing and printing only: every command is a call of the library
(``bll_ref``) or of ``exporters``, which never import this package.

Exit codes: 0 success; 1 a verified mismatch (verify, c-header --compile); 2 bad input or
environment (one line on stderr naming the problem; never a traceback for a user mistake);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); temporary files are removed either way;
141 (SIGPIPE's status, nothing printed) when the reader of stdout went away (``bll-ref verify F | head``).
"""
from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..fileio import raise_if_signalled, sigterm_as_exit
from ..parallel import WorkerError
from .commands import add_commands
from .common import Help
from .export import add_export_commands
from .learn import add_learn_command
from .qonnx import add_qonnx_command
from .train import add_train_command, given_train_options

__all__ = ["main"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bll-ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bll-ref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_command(sub)
    add_commands(sub)
    add_export_commands(sub)
    add_learn_command(sub)
    add_qonnx_command(sub)
    for p in sub.choices.values():
        p.formatter_class = Help
    args = parser.parse_args(argv)
    if args.command == "train":  # which options were given, not defaulted (--resume, inapplicable ones)
        args._given = given_train_options(sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_as_exit():  # SIGTERM unwinds like Ctrl-C: temporary files are removed
            rc = args.func(args)
            raise_if_signalled()  # a signal that a library's cleanup swallowed still ends the command
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return rc
    except ValueError as e:
        print(f"bll-ref {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (WorkerError, FloatingPointError) as e:  # a dead worker, a diverging run: exit 2, one line
        print(f"bll-ref {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:  # `bll-ref verify ... | head`: the reader left; end quietly as Unix tools do
        if not _stdout_gone():
            print(f"bll-ref {args.command}: error: {_os_message(e)}", file=sys.stderr)
            return 2
        _silence_stdout()
        return 128 + 13  # SIGPIPE's status
    except OSError as e:  # file system: read-only, full, a file or directory in the way
        print(f"bll-ref {args.command}: error: {_os_message(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"bll-ref {args.command}: error: out of memory; use a smaller model, batch or "
              "--limit-train", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bll-ref {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_gone() -> bool:
    """True when the reader of our stdout has gone (a pipe whose other end is closed)."""
    import select
    try:
        fd = sys.stdout.fileno()
        if not hasattr(select, "poll"):
            return True
        p = select.poll()
        p.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout():
    """Point fd 1 at /dev/null so that the interpreter's final flush of what is still buffered does
    not print "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _os_message(e: OSError) -> str:
    msg = e.strerror or str(e)
    if e.filename is not None and os.fspath(e.filename) not in msg:
        msg = f"{os.fspath(e.filename)}: {msg}"
    return msg
