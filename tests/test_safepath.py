"""The one gate between values from data and paths: the UID grammar and the root check."""

import os

import pytest

from ctpipe.safepath import UnsafePath, inside, uid_component, uid_reason

HOSTILE_UIDS = [
    "..",
    ".",
    "/",
    "/etc/passwd",
    "1.2\x00.3",
    "1" * 65,
    "",
    "1..2",
    "01.2",
    "1.2.",
    "a.b",
]


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
def test_hostile_uids_are_refused_with_a_reason_that_does_not_quote_them(uid):
    with pytest.raises(UnsafePath) as err:
        uid_component(uid)
    if len(uid) > 2:
        assert uid not in str(err.value)


@pytest.mark.parametrize("uid", ["0", "1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 39, "1" * 64])
def test_valid_uids_pass_unchanged(uid):
    assert uid_component(uid) == uid and uid_reason(uid) == ""


def test_a_non_string_is_refused():
    with pytest.raises(UnsafePath, match="text"):
        uid_component(1.2)


def test_inside_refuses_escapes_links_out_and_the_root_itself(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert inside(root, root / "1.2" / "seg.dcm") == (root / "1.2" / "seg.dcm").resolve()
    for bad in (root / "..", root / ".." / "x", root, tmp_path / "elsewhere", "/etc/passwd"):
        with pytest.raises(UnsafePath):
            inside(root, bad)
    os.symlink(tmp_path, root / "link")  # a link inside that points out
    with pytest.raises(UnsafePath):
        inside(root, root / "link" / "x")
    with pytest.raises(UnsafePath, match="NUL"):
        inside(root, str(root) + "/a\x00b")
