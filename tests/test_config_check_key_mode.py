"""``mbsec config check`` warns, in one line with the fix, when the server's private key is
readable by its group or by others (issue 13 item 6); a 0600 key passes silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import Pki
from test_settings import write_config

from mbsec.cli import main as mbsec_main


@pytest.mark.parametrize(("mode", "who"), [(0o640, "group"), (0o604, "others"),
                                           (0o644, "group and others")])
def test_key_readable_by_others_is_one_warning_with_the_fix(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], mode: int, who: str
) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.server.key, key)
    key.chmod(mode)
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace(str(pki.server.key), str(key)))
    assert mbsec_main(["config", "check", str(cfg)]) == 0  # it works; it is a warning
    out = capsys.readouterr()
    assert "ok" in out.out
    assert out.err.splitlines() == [
        f"warning: tls.key: {key} is readable by {who} (mode {mode:04o}); "
        f"fix: chmod 600 {key} (owner: the user mbsec runs as)"]


def test_key_mode_0600_passes_silently(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.server.key, key)
    key.chmod(0o600)
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace(str(pki.server.key), str(key)))
    assert mbsec_main(["config", "check", str(cfg)]) == 0
    assert capsys.readouterr().err == ""
