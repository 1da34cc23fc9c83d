"""The local admin credential (gateway.local_admin) and the names the audit log gives admin
keys (gateway.auth): a 0600 file, found by the ops CLI, stale ones removed; no Ray needed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway import local_admin
from gateway.admin import _loopback
from gateway.auth import Keys
from gateway.errors import GatewayError


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(local_admin.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_written_for_its_user_only_and_found(home):
    written = local_admin.write("0.0.0.0:5000", "k" * 43)
    assert written.path.parent == home and written.path.stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    found = local_admin.find()
    assert (found.address, found.key, found.pid) == ("127.0.0.1:5000", "k" * 43, os.getpid())  # dialled on loopback
    assert local_admin.find("127.0.0.1:5000") == found == local_admin.find("localhost:5000")
    assert local_admin.find("127.0.0.1:6000") is None
    written.remove()
    assert local_admin.find() is None


def test_a_stale_credential_is_removed(home):
    home.mkdir()
    stale = home / "gateway-1.json"
    stale.write_text(f'{{"address": "127.0.0.1:5000", "key": "old", "pid": {_dead_pid()}}}')
    (home / "gateway-2.json").write_text("{not json")  # not a credential: left alone
    assert local_admin.find() is None
    assert not stale.exists() and (home / "gateway-2.json").exists()


def test_several_live_gateways_need_an_address(home):
    local_admin.write("127.0.0.1:5000", "mine")
    home.joinpath("gateway-1.json").write_text('{"address": "127.0.0.1:6000", "key": "init", "pid": 1}')
    with pytest.raises(ValueError, match=r"2 gateways run on this host \(127.0.0.1:6000, 127.0.0.1:5000\): "
                                         r"choose one with --address"):
        local_admin.find()
    assert local_admin.find("127.0.0.1:5000").key == "mine"


def test_admin_keys_are_named_by_their_comment_line_or_variable(tmp_path):
    keys_file = tmp_path / "admin.keys"
    keys_file.write_text("# the operators\nk-alice  # alice\n\nk-bob\n")
    keys = Keys.load(admin_key_file=keys_file, env={"PDMESH_ADMIN_KEY": "k-env"})
    keys = Keys(keys.inference, keys.admin, keys.admin_names, local="k-local")
    assert [keys.admin_name(k) for k in ("k-alice", "k-bob", "k-env", "k-local")] == [
        "alice", f"{keys_file}:4", "PDMESH_ADMIN_KEY", "local credential"]
    assert Keys(admin=("a", "b")).admin_name("b") == "admin key 2"
    with pytest.raises(GatewayError, match="wrong admin key"):
        keys.admin_name("k-nobody")
    assert Keys(local="k").admin_name("k") == "local credential"  # the admin service is on with it alone


@pytest.mark.parametrize("peer, loopback", [("ipv4:127.0.0.1:5000", True), ("ipv6:[::1]:5000", True),
                                            ("unix:/tmp/s", True), ("ipv4:10.0.0.2:5000", False),
                                            ("ipv6:[2001:db8::1]:5000", False), ("garbage", False)])
def test_loopback_peers(peer, loopback):
    assert _loopback(peer) is loopback
