"""ZeroMQ CURVE on the replay sockets: the right keys work, anything else gets nowhere."""

import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from flowrl_async.replay.client import ReplayClient, ReplayError
from flowrl_async.replay.curve import make_keys
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.replay.service import ReplayService

from factories import make_group

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture
def keys(tmp_path):
    server = make_keys(tmp_path / "keys", "server")
    authorized = tmp_path / "authorized"
    actor = make_keys(authorized, "actor")  # its public .key is what the server reads
    stranger = make_keys(tmp_path / "elsewhere", "stranger")
    return {"server": server, "actor": actor, "stranger": stranger, "authorized": authorized}


class Running:
    def __init__(self, directory, **kw):
        self.server = ReplayServer(
            ServerConfig(str(directory), "tcp://127.0.0.1:0", max_staleness=None, **kw)
        )
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        while self.server.bound_address is None:
            time.sleep(0.01)
        self.address = self.server.bound_address

    def client(self, **kw):
        return ReplayClient(self.address, request_timeout_s=0.3, max_retries=2, **kw)

    def stop(self):
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


def refused(client) -> bool:
    try:
        client.insert(make_group("intruder"))
    except ReplayError as e:
        assert "no answer" in str(e)
        return True
    finally:
        client.close()
    return False


def test_a_client_with_the_server_key_works_and_one_without_keys_cannot_insert(tmp_path, keys):
    public, secret = keys["server"]
    running = Running(tmp_path / "r", curve_secret_key=str(secret))
    try:
        good = running.client(curve_server_key=public)
        assert good.insert(make_group("a")) is True
        assert [g.group_id for g, _ in good.sample(1, version=0)] == ["a"]
        assert refused(running.client())  # no keys: plain text never gets through
        assert refused(running.client(curve_server_key=keys["stranger"][0]))  # wrong server
        stats = good.stats()
        assert (stats["inserted"], stats["rejected"]) == (1, 0)  # the others never arrived
        good.close()
    finally:
        running.stop()


def test_with_authorized_keys_only_those_clients_get_in(tmp_path, keys):
    public, secret = keys["server"]
    running = Running(
        tmp_path / "r", curve_secret_key=str(secret), curve_authorized_keys=str(keys["authorized"])
    )
    try:
        actor = running.client(curve_server_key=public, curve_client_key=keys["actor"][1])
        assert actor.insert(make_group("a")) is True
        assert refused(running.client(curve_server_key=public))  # a fresh, unknown key pair
        stranger_secret = keys["stranger"][1]
        assert refused(running.client(curve_server_key=public, curve_client_key=stranger_secret))
        make_keys(keys["authorized"], "late")  # added while serving: no restart needed
        late = running.client(
            curve_server_key=public, curve_client_key=keys["authorized"] / "late.key_secret"
        )
        assert late.insert(make_group("b")) is True
        assert actor.stats()["inserted"] == 2
        actor.close()
        late.close()
    finally:
        running.stop()


def test_a_half_written_key_file_is_skipped_and_a_deleted_key_is_refused(tmp_path, keys):
    # before: the bad file raised inside pyzmq's authenticator thread, which died, and every
    # handshake after hung; a deleted key stayed authorised
    public, secret = keys["server"]
    running = Running(
        tmp_path / "r", curve_secret_key=str(secret), curve_authorized_keys=str(keys["authorized"])
    )
    try:
        (keys["authorized"] / "half.key").write_bytes(b"\xff\xfe metad")  # a torn copy
        late_public, late_secret = make_keys(keys["authorized"], "late")
        late = running.client(curve_server_key=public, curve_client_key=late_secret)
        assert late.insert(make_group("a")) is True  # the bad file skipped, the handler alive
        late.close()
        late_public.unlink()  # revoked: from the next handshake on
        assert refused(running.client(curve_server_key=public, curve_client_key=late_secret))
        actor = running.client(curve_server_key=public, curve_client_key=keys["actor"][1])
        assert actor.insert(make_group("b")) is True
        actor.close()
    finally:
        running.stop()


def test_the_service_wrapper_checkpoints_through_its_own_keys(tmp_path, keys):
    _, secret = keys["server"]
    cfg = ServerConfig(
        str(tmp_path / "replay"),
        "tcp://127.0.0.1:0",
        curve_secret_key=str(secret),
        curve_authorized_keys=str(keys["authorized"]),
    )
    service = ReplayService(cfg)
    try:
        assert service.checkpoint(tag="t")["path"].endswith("-t.ckpt")
    finally:
        service.stop()


def test_key_mistakes_are_refused_at_start(tmp_path, keys):
    public, secret = keys["server"]
    d = str(tmp_path / "r")
    with pytest.raises(ValueError, match="needs curve_secret_key"):
        ReplayServer(ServerConfig(d, curve_authorized_keys=str(keys["authorized"])))
    with pytest.raises(ValueError, match="no secret key"):
        ReplayServer(ServerConfig(d, curve_secret_key=str(public)))
    with pytest.raises(FileNotFoundError, match="no CURVE certificate"):
        ReplayServer(ServerConfig(d, curve_secret_key=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="authorized client keys"):
        ReplayServer(ServerConfig(d, curve_secret_key=str(secret), curve_authorized_keys=d + "x"))
    with pytest.raises(ValueError, match="needs curve_server_key"):
        ReplayClient("tcp://127.0.0.1:1", curve_client_key=keys["actor"][1])


@pytest.mark.integration
def test_cli_flags_turn_curve_on(tmp_path, keys):
    public, secret = keys["server"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowrl_async.replay.server", "--dir", str(tmp_path / "r")]
        + ["--address", "tcp://127.0.0.1:0", "--curve-secret-key", str(secret)]
        + ["--curve-authorized-keys", str(keys["authorized"])],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        found = re.search(r"on (tcp://\S+),", proc.stdout.readline())
        assert found
        actor = ReplayClient(
            found.group(1), request_timeout_s=2.0, max_retries=3,
            curve_server_key=public, curve_client_key=keys["actor"][1],
        )  # fmt: skip
        assert actor.insert_many([make_group("a"), make_group("b")]) == [True, True]
        actor.close()
        stranger = ReplayClient(found.group(1), request_timeout_s=0.3, max_retries=2,
                                curve_server_key=public)  # fmt: skip
        assert refused(stranger)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


@pytest.fixture
def roles(tmp_path, keys):
    """An authorized-keys directory with roles: the actor's key in it, the learner's in
    its learner/ subdirectory."""
    learner = make_keys(keys["authorized"] / "learner", "learner")
    return {**keys, "learner": learner}


def forbidden(call) -> str:
    with pytest.raises(ReplayError, match="not allowed for this client's key") as e:
        call()
    return str(e.value)


def test_only_the_learners_key_may_move_the_version_sample_or_rewind(tmp_path, roles):
    # before: any authorized key could do everything
    public, secret = roles["server"]
    running = Running(
        tmp_path / "r", curve_secret_key=str(secret), curve_authorized_keys=str(roles["authorized"])
    )
    try:
        actor = running.client(curve_server_key=public, curve_client_key=roles["actor"][1])
        learner = running.client(curve_server_key=public, curve_client_key=roles["learner"][1])
        assert actor.insert(make_group("a")) is True
        assert actor.insert_many([make_group("b"), make_group("c")]) == [True, True]
        assert actor.admit(1, 2) == [0, 1]
        actor.release(1)
        assert actor.stats()["size"] == 3
        assert "(actor)" in forbidden(lambda: actor.set_version(7))
        forbidden(lambda: actor.admit(1, 1, version=7))  # the version rides on an admit
        forbidden(lambda: actor.sample(1, 0))
        forbidden(lambda: actor.checkpoint())
        forbidden(lambda: actor.prune([]))
        forbidden(lambda: actor.rewind("ckpt-00000001-0000000000.ckpt"))
        stats = learner.stats()
        assert stats["version"] == 0 and stats["sampled_groups"] == 0
        assert stats["rejected_by"]["forbidden"] == 6
        assert learner.set_version(1) == 1
        assert len(learner.sample(2, 1)) == 2
        assert learner.checkpoint()["path"].endswith(".ckpt")
        actor.close()
        learner.close()
    finally:
        running.stop()


def test_a_deleted_key_loses_its_open_connection_too(tmp_path, roles, monkeypatch):
    monkeypatch.setattr("flowrl_async.replay.server.RECHECK_S", 0.0)
    public, secret = roles["server"]
    running = Running(
        tmp_path / "r", curve_secret_key=str(secret), curve_authorized_keys=str(roles["authorized"])
    )
    try:
        learner = running.client(curve_server_key=public, curve_client_key=roles["learner"][1])
        assert learner.set_version(1) == 1  # connected
        roles["learner"][0].unlink()
        assert "no longer authorized" in forbidden(lambda: learner.set_version(2))
        learner.close()
    finally:
        running.stop()


def test_cluster_mode_needs_the_learner_to_have_a_key_of_its_own(tmp_path, roles):
    from flowrl_async.config import TrainConfig, validate
    from flowrl_async.run.processes import replay_keys

    cfg = TrainConfig()
    cfg.cluster.address = "ray://head:10001"
    r = cfg.replay
    r.curve_secret_key, r.curve_authorized_keys = str(roles["server"][1]), str(roles["authorized"])
    r.curve_client_key = str(roles["actor"][1])
    with pytest.raises(ValueError, match="replay.curve_learner_key"):
        validate(cfg)
    r.curve_learner_key = str(roles["learner"][1])
    with pytest.raises(ValueError, match="replay.curve_public_key"):  # else clients read
        validate(cfg)  # the server's secret certificate
    r.curve_public_key = str(roles["server"][0])
    validate(cfg)
    assert replay_keys(cfg)["curve_client_key"] == str(roles["actor"][1])
    assert replay_keys(cfg, learner=True)["curve_client_key"] == str(roles["learner"][1])
