"""irishost's ``[relay] permissions``: the embedded relay's permissions file.

The key is checked with the rest of the config (a bad file is a config
error naming the service's file, the key, and the permissions file's line
and key); a host that embeds its relay runs it with the file, so a client
of another user cannot register under the host's cluster; a reload
(SIGHUP) re-reads the file, and one that cannot be used keeps the rules
in force.
"""

from __future__ import annotations

import signal

import pytest
from other_user import OtherUser

from irishost.config import Config, ConfigError, load_config

SERVICE = '[service]\ncluster = "billing"\nhandler = "billing:Handler"\n'


def test_the_file_is_found_beside_the_config_and_crosses_to_the_fork_server(tmp_path):
    (tmp_path / "permissions.toml").write_text('default = "closed"\n')
    (tmp_path / "service.toml").write_text(SERVICE + '[relay]\npermissions = "permissions.toml"\n')
    config = load_config(tmp_path / "service.toml")
    assert config.relay.permissions == tmp_path / "permissions.toml"
    assert Config.from_plain(config.to_plain()) == config
    assert load_config(_written(tmp_path, SERVICE)).relay.permissions is None


def _written(directory, text: str):
    path = directory / "plain.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("permissions", "problem"),
    [
        ('default = "open"\n[cluster.billing]\nserve = ["billing-user-that-is-not"]\n',
         '{file}:3: cluster.billing.serve: unknown user "billing-user-that-is-not"'),
        ('[cluster.billing]\nserve = ["root"]\n',
         '{file}: default: required key is missing: default = "open" or "closed"'),
        (None, "{file}: cannot read: No such file or directory"),
    ],
)  # fmt: skip
def test_a_bad_permissions_file_is_a_config_error_naming_the_key(tmp_path, permissions, problem):
    file = tmp_path / "permissions.toml"
    if permissions is not None:
        file.write_text(permissions)
    config = _written(tmp_path, SERVICE + '[relay]\npermissions = "permissions.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(caught.value) == f"{config}: relay.permissions: {problem.format(file=file)}"


ONLY_ROOT_SERVES = 'default = "open"\n[cluster."{cluster}"]\nserve = ["root"]\n'


@pytest.fixture
def other_user():
    users = OtherUser()
    yield users
    users.cleanup()


def test_the_embedded_relay_keeps_the_cluster_to_its_user_and_reloads_the_file(service, other_user):
    permissions = service.dir / "permissions.toml"
    permissions.write_text(ONLY_ROOT_SERVES.format(cluster=service.cluster))
    service.config(relay={"permissions": "permissions.toml"})
    host = service.start()

    impostor = other_user.start(str(service.port), "serve", service.cluster)
    denied, reason = impostor.line()
    assert denied == "denied" and "user nobody (uid 65534) may not serve cluster" in reason
    assert [service.request(b"echo:me") for _ in range(100)] == [b"echo:me"] * 100

    permissions.write_text('default = "sometimes"\n')
    host.proc.send_signal(signal.SIGHUP)
    host.wait_log("reload failed")
    assert f"relay.permissions: {permissions}:1: default: expected" in host.log()
    impostor = other_user.start(str(service.port), "serve", service.cluster)
    assert impostor.line()[0] == "denied"  # the rules in force stay

    permissions.write_text('default = "open"\n')
    host.proc.send_signal(signal.SIGHUP)
    host.wait_log("reload complete")
    host.wait_log("permissions reloaded")
    impostor = other_user.start(str(service.port), "serve", service.cluster)
    assert impostor.line() == ["ready"]
    impostor.finish()
    assert host.stop() == 0
