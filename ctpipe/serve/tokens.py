"""Named HTTP bearer tokens with scopes, kept as SHA-256 hashes in a file outside git.

``python -m ctpipe.serve.tokens NAME --scopes store read --file tokens.yaml`` makes a token,
prints it once and stores only its hash. The file (owner-only, 0600)::

    tokens:
      - {name: orthanc, sha256: 3f9c..., scopes: [store]}
      - {name: grafana, sha256: 81ab..., scopes: [metrics]}

Scopes: ``store`` (STOW-RS), ``read`` (``/jobs``), ``metrics`` (``/metrics``). The tokens are
random (24 bytes), so a plain SHA-256 cannot be reversed by trying candidates.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ctpipe.serve.spool import durable_write

SCOPES = ("store", "read", "metrics")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class TokenError(ValueError):
    """A tokens file the server cannot use; the message names the file and the entry."""


@dataclass(frozen=True)
class Token:
    name: str
    sha256: str
    scopes: frozenset[str]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load(path: Path) -> list[Token]:
    """The tokens of ``path``, checked (names, hashes, scopes, no duplicates)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TokenError(f"{path}: cannot read tokens ({type(err).__name__})") from None
    entries = raw.get("tokens") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TokenError(f"{path}: no 'tokens' list")
    tokens: list[Token] = []
    for i, entry in enumerate(entries):
        where = f"{path}: tokens[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "sha256", "scopes"}:
            raise TokenError(f"{where}: needs exactly name, sha256 and scopes")
        name, hashed, scopes = entry["name"], entry["sha256"], entry["scopes"]
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise TokenError(f"{where}: name must be 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(hashed, str) or not re.fullmatch(r"[0-9a-f]{64}", hashed):
            raise TokenError(f"{where}: sha256 must be 64 lowercase hex digits")
        if not isinstance(scopes, list) or not set(scopes) <= set(SCOPES) or not scopes:
            raise TokenError(f"{where}: scopes must be a list of {', '.join(SCOPES)}")
        if any(t.name == name or t.sha256 == hashed for t in tokens):
            raise TokenError(f"{where}: name or token used twice")
        tokens.append(Token(name, hashed, frozenset(scopes)))
    return tokens


def identify(tokens: list[Token], presented: str) -> Token | None:
    """The token whose hash matches ``presented`` (compared in constant time), or None."""
    given = digest(presented)
    found = None
    for token in tokens:
        if hmac.compare_digest(token.sha256, given):
            found = token
    return found


def add(path: Path, name: str, scopes: list[str]) -> str:
    """Make a token called ``name``, store its hash in ``path`` (created 0600), return it."""
    path = Path(path)
    entries = (yaml.safe_load(path.read_text()) or {}).get("tokens", []) if path.exists() else []
    if any(isinstance(e, dict) and e.get("name") == name for e in entries):
        raise TokenError(f"{path}: a token called {name} exists already")
    value = secrets.token_urlsafe(24)
    entries.append({"name": name, "sha256": digest(value), "scopes": sorted(set(scopes))})
    text = yaml.safe_dump({"tokens": entries}, default_flow_style=None, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable_write(path, text.encode())
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctpipe.serve.tokens",
        description="Make a named bearer token for the node's HTTP API; prints it once and "
        "stores only its SHA-256 in the tokens file (serve.yaml http.tokens_file).",
    )
    parser.add_argument("name", help="who uses it (shown in the audit log)")
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, required=True)
    parser.add_argument("--file", type=Path, required=True, help="tokens file (outside git)")
    args = parser.parse_args(argv)
    if not NAME.fullmatch(args.name):
        parser.error("name: 1-64 letters, digits, '_', '.', '-'")
    try:
        print(add(args.file, args.name, args.scopes))
    except TokenError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
