"""``python -m ctpipe.predict``: the command that runs an exported package on a DICOM study.

The code is :mod:`ctpipe.deploy.predict`; with ``--queue URL`` the series go to the workers of a
RabbitMQ broker instead (:mod:`ctpipe.serve.retro`). This module keeps the documented command short.
"""

import logging
import sys

from ctpipe.deploy.predict import main, parse_args


def entry(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.queue is None:
        return main(argv)
    from ctpipe.serve.retro import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(entry())
