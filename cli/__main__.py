"""The `tether` command line (also `python -m tether`).

tether robustness  what each method keeps of a pre-trained model out of distribution
tether parity      the cross-framework equivalence run
tether bench       the step cost of tether's optimizers against each framework's own
"""

import argparse
import sys

from . import __version__


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tether", description="tether: robust fine-tuning optimizers.")
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import bench, parity, robustness

    robustness.add_arguments(
        commands.add_parser(
            "robustness",
            help="fine-tune a pre-trained model with every method and measure ID and OOD accuracy",
            description=robustness.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    parity.add_arguments(
        commands.add_parser(
            "parity",
            help="compare every backend's optimizers with the core's NumPy run",
            description=parity.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    bench.add_arguments(
        commands.add_parser(
            "bench",
            help="time tether's optimizers against each framework's AdamW and SGD",
            description=bench.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    args = parser.parse_args(argv)
    if args.command == "robustness":
        return robustness.main(args)
    if args.command == "parity":
        return parity.main(args)
    if args.command == "bench":
        return bench.main(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
