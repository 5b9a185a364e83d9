"""The secrets `make run` keeps in .run/ (chatjobs.devkey): written with mode 600, reused
while they still work, replaced when they do not."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from chatjobs.devkey import flower_auth, kept, read_secret, write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_is_written_with_mode_600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret(tmp_path / "run" / "demo-key", "cj_secret")
    finally:
        os.umask(old)
    assert mode(tmp_path / "run" / "demo-key") == 0o600
    assert read_secret(tmp_path / "run" / "demo-key") == "cj_secret"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["demo-key"]


def test_a_missing_or_empty_file_holds_no_secret(tmp_path: Path) -> None:
    assert read_secret(tmp_path / "absent") is None
    (tmp_path / "empty").write_text("\n")
    assert read_secret(tmp_path / "empty") is None


def test_a_kept_secret_that_still_works_is_reused_and_none_is_created(tmp_path: Path) -> None:
    path = tmp_path / "demo-key"
    made: list[str] = []

    def create() -> str:
        made.append(f"cj_{len(made)}")
        return made[-1]

    first = kept(path, valid=lambda key: key in made, create=create)
    second = kept(path, valid=lambda key: key in made, create=create)
    assert first == ("cj_0", True)
    assert second == ("cj_0", False)
    assert made == ["cj_0"]


def test_a_kept_secret_that_no_longer_works_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "demo-key"
    write_secret(path, "cj_from_a_database_since_reset")
    assert kept(path, valid=lambda key: False, create=lambda: "cj_new") == ("cj_new", True)
    assert read_secret(path) == "cj_new"
    assert mode(path) == 0o600


def test_a_reused_secret_readable_by_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "flower-auth"
    path.write_text("admin:pw\n")
    path.chmod(0o644)
    assert flower_auth(path) == ("admin:pw", False)
    assert mode(path) == 0o600


def test_flower_auth_is_generated_once_as_user_and_password(tmp_path: Path) -> None:
    path = tmp_path / "flower-auth"
    pair, new = flower_auth(path)
    user, _, password = pair.partition(":")
    assert new and user == "admin" and len(password) >= 20
    # Flower splits FLOWER_BASIC_AUTH on commas and the pair on its first colon.
    assert "," not in password and ":" not in password
    assert flower_auth(path) == (pair, False)
