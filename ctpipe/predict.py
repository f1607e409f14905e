"""``python -m ctpipe.predict``: the command that runs an exported package on a DICOM study.

The code is :mod:`ctpipe.deploy.predict`; this module keeps the documented command short.
"""

import sys

from ctpipe.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
