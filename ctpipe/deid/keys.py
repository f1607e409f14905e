"""The project secret and everything derived from it: UIDs, pseudonyms, date offsets, path hashes.

Every derived value is an HMAC-SHA256 under the secret with a domain label, so the same input
always maps to the same output (in every file, run and study), while nobody without the key can
recompute or invert the mapping by trying candidate UIDs or names (the weakness of unsalted
hashes, e.g. RSNA CTP's ``@hashuid``).

The secret is read from the environment variable ``CTPIPE_DEID_KEY``, else from a key file kept
outside git and outside every DVC output. Only the built-in synthetic cohort may fall back to
:data:`DEMO_KEY`, which is public and therefore protects nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

KEY_ENV = "CTPIPE_DEID_KEY"
# Public demo secret for the synthetic cohort only (its "patients" are fictitious). Never real data.
DEMO_KEY = b"ctpipe-demo-key:synthetic-cohort-only:public:not-a-secret"
# A real cohort's key must look generated, not typed: at least this many characters and this many
# distinct ones (``secrets.token_hex(32)`` gives 64 characters of 16 kinds). This refuses short
# keys and passphrases of a few words; it cannot measure entropy, so generate the key.
MIN_KEY_CHARS = 32
MIN_KEY_DISTINCT = 12
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2): root + decimal of a 128-bit integer


class DeidKeyError(RuntimeError):
    """No usable secret for a real cohort, or a key stored where it could be pushed."""


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def load_key(
    key_file: str | Path | None, synthetic: bool, forbidden: list[Path] | None = None
) -> tuple[bytes, str]:
    """Return ``(key, source)`` with source ``env``, ``file`` or ``demo``.

    Args:
        key_file: path of the key file (``~`` expanded); used when the variable is unset.
        synthetic: the cohort is the built-in synthetic one, which may use :data:`DEMO_KEY`.
        forbidden: folders the key file must not be inside (the stage's inputs and outputs).

    Raises:
        DeidKeyError: no key for a real cohort, a key that is too short, or a key file inside a
            folder that is (or may be) pushed.
    """
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        key, source = env.encode("utf-8"), "env"
    elif key_file and Path(key_file).expanduser().is_file():
        path = Path(key_file).expanduser()
        for folder in forbidden or []:
            if _inside(path, folder):
                raise DeidKeyError(
                    f"key file {path} is inside {folder}, which DVC may push; "
                    "move it outside the repository's outputs"
                )
        key, source = path.read_bytes().strip(), "file"
    elif synthetic:
        log.warning(
            "no %s and no key file %s: using the public DEMO key, acceptable only for "
            "the synthetic cohort",
            KEY_ENV,
            key_file,
        )
        return DEMO_KEY, "demo"
    else:
        raise DeidKeyError(
            f"refusing to de-identify a real cohort without a secret: set {KEY_ENV} or create the "
            f'key file {key_file} (e.g. `python -c "import secrets; print(secrets.token_hex(32))" '
            f"> {key_file}`), outside git and outside every DVC output"
        )
    if len(key) < MIN_KEY_CHARS or len(set(key)) < MIN_KEY_DISTINCT or b" " in key:
        raise DeidKeyError(
            f"the de-identification key ({source}) looks typed, not generated: it needs at least "
            f"{MIN_KEY_CHARS} characters of {MIN_KEY_DISTINCT} kinds or more and no spaces; make "
            'one with `python -c "import secrets; print(secrets.token_hex(32))"`'
        )
    return key, source


class Keyring:
    """Keyed, deterministic replacements derived from one secret."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._uids: dict[str, str] = {}

    def mac(self, domain: str, value: str) -> bytes:
        """HMAC-SHA256 of ``value`` under the key, separated by a domain label."""
        msg = domain.encode("ascii") + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def fingerprint(self) -> str:
        """An identifier of the key, to tell runs apart. Derived from the key alone, it lets whoever
        holds it test guesses of the key offline: it is written to the private folder only."""
        return self.mac("fingerprint", "ctpipe").hex()[:16]

    def uid(self, original: str) -> str:
        """``2.25.<int>`` from the first 128 bits of the HMAC: at most 44 characters."""
        original = original.strip().rstrip("\x00")
        new = self._uids.get(original)
        if new is None:
            new = UID_ROOT + str(int.from_bytes(self.mac("uid", original)[:16], "big"))
            self._uids[original] = new
        return new

    def patient_id(self, patient_key: str) -> str:
        """Pseudonymous Patient ID (LO): stable for a patient across runs and studies."""
        return "ANON" + self.mac("patient", patient_key)[:8].hex().upper()

    def patient_name(self, patient_key: str) -> str:
        """Pseudonymous Patient's Name (PN) matching :meth:`patient_id`."""
        return "ANONYMIZED^" + self.patient_id(patient_key)

    def date_offset(self, patient_key: str, lo: int, hi: int) -> dt.timedelta:
        """Per-patient whole-day shift in ``[lo, hi]``, never zero (intervals are preserved)."""
        zero = lo <= 0 <= hi
        count = hi - lo + 1 - zero
        if count <= 0:
            raise ValueError(f"date shift range [{lo}, {hi}] holds no non-zero day")
        days = lo + int.from_bytes(self.mac("date", patient_key)[:8], "big") % count
        return dt.timedelta(days=days + 1 if zero and days >= 0 else days)

    def path_hash(self, relative_path: str) -> str:
        """Keyed hash naming a quarantined input without revealing its path."""
        return self.mac("path", relative_path).hex()[:24]
