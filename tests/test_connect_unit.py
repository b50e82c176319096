"""deploy/systemd/mbsec-connect.service: its command line is a valid ``mbsec connect`` one
(loopback listen, the server verified by name, the key handed over as a systemd credential),
and the unit is sandboxed (``systemd-analyze security --offline=true``: 2.0 or better)."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from conftest import fail_or_skip

from mbsec.connect import _parser, config_from_args

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "mbsec-connect.service"


def service() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text().replace("\\\n", " "))
    return cp["Service"]


def test_the_command_line_is_valid_and_listens_on_loopback_only() -> None:
    s = service()
    argv = shlex.split(s["ExecStart"].replace("${CREDENTIALS_DIRECTORY}", "/run/credentials"))
    assert argv[0].endswith("/mbsec") and argv[1] == "connect"
    cfg = config_from_args(_parser().parse_args(argv[2:]))
    assert cfg.listen == ("127.0.0.1", 502)
    assert cfg.server[1] == 802 and cfg.server_name == cfg.server[0]
    assert "--allow-remote" not in argv
    # the key reaches the service as a credential: it can stay 0600 root on the host
    name, _, path = s["LoadCredential"].partition(":")
    assert str(cfg.key) == f"/run/credentials/{name}" and path.startswith("/etc/")
    assert s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"  # port 502 as a dynamic user
    assert s["DynamicUser"] == "yes"


def test_the_unit_scores_2_or_better_in_systemd_analyze_security(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        fail_or_skip("systemd-analyze missing: apt-get install systemd")
    done = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, check=False, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.0, done.stdout
