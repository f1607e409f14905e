"""A params profile as ``dvc exp run`` arguments: ``python scripts/profile.py profiles/real-size.yaml``
prints one ``--set-param KEY=VALUE`` pair per key of the profile, after checking that params.yaml
with the profile applied is valid (every key exists, every value passes ``ctpipe.config``).

    dvc exp run $(python scripts/profile.py profiles/real-size.yaml)   # or: make exp PROFILE=...

Values are printed as compact JSON (valid YAML, no spaces), so the shell splits the output into
exactly the arguments above. Exit status 2 with the reason when the profile does not fit.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

from ctpipe import config, profiles


def arguments(profile: dict[str, object]) -> list[str]:
    """``--set-param KEY=VALUE`` for each key of ``profile``, in its order."""
    out = []
    for key, value in profile.items():
        out += ["--set-param", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    return out


def applied(params: dict, profile: dict[str, object], source: str) -> dict:
    """A copy of ``params`` with the profile applied, checked by :func:`ctpipe.config.validate`."""
    out = copy.deepcopy(params)
    for key, value in profile.items():
        profiles.override(out, key, value, source=source)
    config.validate(out, f"params.yaml with {source}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="a profile, e.g. profiles/real-size.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="base params")
    args = parser.parse_args(argv)
    try:
        profile = profiles.load(args.profile)
        params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
        applied(params, profile, str(args.profile))
    except (config.ConfigError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(" ".join(arguments(profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
