"""Security properties of the running system, checked from outside.

- Nothing listens beyond loopback: the relay process and a whole irishost
  (embedded relay, metrics) bind 127.0.0.1 / ::1 only, and a connection to
  this machine's own non-loopback address is refused.
- What a host creates is private: its shared-memory rings are 0600 and
  already unlinked, its control socket is 0600 in a 0700 directory, so
  another user cannot connect (tried as ``nobody`` when run as root).
- Nothing on a data path unpickles: no module of iris/ or irishost/ imports
  pickle or its kin, importing them all leaves pickle unloaded, and worker
  frames are msgpack with no hooks, so a pickle inside a frame stays bytes.
- An oversized message is refused on its length, before it is buffered.

Unit-level checks of the same modes are in test_ring.py and test_control.py;
these look at the processes as they run.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import psutil
import pytest
from support import free_port, wait_for

import iris
from iris import codec
from irishost.ops.control import query_status
from irishost.wire import frames

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "iris", ROOT / "irishost"]
LOOPBACK = {"127.0.0.1", "::1"}
NOBODY = 65534
# How long a refusal may take on a loaded two-core machine (it takes milliseconds).
PROMPT = 2.0


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs a process listens on over TCP."""
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}


def own_addresses() -> list[str]:
    """This machine's own non-loopback addresses, one per family.

    Link-local IPv6 is left out (it needs a scope id); nothing here ever
    sends to an address that is not one of this machine's interfaces.
    """
    found: dict[int, str] = {}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = address.address.split("%")[0]
            if ip in LOOPBACK or ip.startswith(("127.", "fe80:")):
                continue
            found.setdefault(address.family, ip)
    return list(found.values())


def assert_refused_on_own_addresses(port: int) -> None:
    addresses = own_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback address to try")
    for address in addresses:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=2).close()


# ---------------------------------------------------------------------------
# Loopback only.


def test_relay_listens_on_loopback_only(relay):
    assert listening(relay.proc.pid) == {("127.0.0.1", relay.port), ("::1", relay.port)}


def test_relay_refuses_this_machines_own_address(relay):
    assert_refused_on_own_addresses(relay.port)


def test_irishost_listens_on_loopback_only(service):
    metrics = free_port()
    service.config(workers={"count": 2}, metrics={"port": metrics})
    host = service.start()
    workers = host.worker_count(2)

    assert listening(host.pid) == {
        ("127.0.0.1", service.port),  # the embedded relay
        ("::1", service.port),
        ("127.0.0.1", metrics),
    }
    for worker in workers:
        assert listening(worker.pid) == set()
    for port in (service.port, metrics):
        assert_refused_on_own_addresses(port)


# ---------------------------------------------------------------------------
# Private files.


def shm_mappings(pid: int) -> dict[str, int]:
    """The shared-memory rings ``pid`` maps, by mapping, with their file modes.

    /proc/PID/map_files reaches the files behind the mappings even though
    their names are unlinked; reading it takes CAP_SYS_ADMIN.
    """
    modes = {}
    directory = f"/proc/{pid}/map_files"
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        with contextlib.suppress(FileNotFoundError):  # unmapped meanwhile
            if "/dev/shm/irishost-" in os.readlink(path):
                info = os.stat(path)
                assert info.st_uid == os.geteuid()
                modes[entry] = stat.S_IMODE(info.st_mode)
    return modes


def connect_as(uid: int, path: Path) -> str:
    """Try to connect to the unix socket at ``path`` as user ``uid``, in a
    forked child (the interpreter may live where that user cannot read)."""
    pid = os.fork()
    if pid == 0:  # the child does system calls only, then _exit
        code = 3
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
            code = 0
        except PermissionError:
            code = 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 1: "permission denied"}.get(
        os.waitstatus_to_exitcode(status), "other error"
    )


@pytest.fixture
def open_dir():
    """A directory every user may traverse (pytest's tmp_path is 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="irishost-security-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading map_files and switching users need root")
def test_what_a_running_host_creates_is_private(service, open_dir):
    control = open_dir / "run" / "control.sock"
    service.config(workers={"count": 2}, control={"socket": str(control)})
    old_umask = os.umask(0)  # the modes must not depend on the umask the host inherits
    try:
        host = service.start(wait=False)
    finally:
        os.umask(old_umask)
    host.wait_serving(service.conn)
    workers = host.worker_count(2)

    # Rings: two per worker, 0600, mapped by the supervisor and by their worker,
    # their names unlinked before anyone else could open them.
    supervisor = shm_mappings(host.pid)
    assert len(supervisor) >= 4 and set(supervisor.values()) == {0o600}
    for worker in workers:
        mine = shm_mappings(worker.pid)
        assert len(mine) >= 2 and set(mine.values()) == {0o600}
    assert service.shm_leftovers() == []

    # The control socket: 0600 in a 0700 directory, so only its owner gets in.
    assert stat.S_IMODE(control.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(control.stat().st_mode)
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    assert query_status(control)["workers"]
    assert connect_as(NOBODY, control) == "permission denied"
    control.parent.chmod(0o755)  # with the directory open, the socket's mode alone bars
    assert connect_as(NOBODY, control) == "permission denied"
    control.chmod(0o666)  # the control: opened up, the same user gets in
    assert connect_as(NOBODY, control) == "connected"
    assert host.stop() == 0, host.log()


# ---------------------------------------------------------------------------
# No unpickling.

# Modules that deserialise into arbitrary objects (multiprocessing pickles
# whatever crosses its queues and pipes).
UNPICKLERS = {
    "pickle",
    "_pickle",
    "cPickle",
    "cloudpickle",
    "dill",
    "jsonpickle",
    "shelve",
    "marshal",
    "copyreg",
    "multiprocessing",
}
UNPACK_HOOKS = {"ext_hook", "object_hook", "object_pairs_hook", "list_hook"}


def called(call: ast.Call) -> str:
    """The name a call calls: ``f`` of ``f(...)`` and of ``module.f(...)``."""
    return getattr(call.func, "attr", getattr(call.func, "id", ""))


def sources() -> list[Path]:
    files = sorted(path for package in PACKAGES for path in package.rglob("*.py"))
    assert len(files) > 20
    return files


def test_no_module_imports_an_unpickler():
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and called(node) in ("__import__", "import_module"):
                names = [arg.value for arg in node.args if isinstance(arg, ast.Constant)]
            else:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {name}"
                for name in names
                if isinstance(name, str) and name.split(".")[0] in UNPICKLERS
            ]
    assert found == []


def test_importing_everything_leaves_pickle_unloaded():
    code = (
        "import importlib, pkgutil, sys, iris, irishost\n"
        "for package in (iris, irishost):\n"
        "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if not module.name.endswith('__main__'):  # __main__ would run the program\n"
        "            importlib.import_module(module.name)\n"
        "print(sorted(m for m in sys.modules if m in {'pickle', '_pickle', 'multiprocessing'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_msgpack_is_unpacked_without_hooks():
    calls = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and called(node) in ("unpackb", "Unpacker", "unpack"):
                calls.append((path.relative_to(ROOT), node.lineno, node))
    assert calls, "no msgpack unpacking found: the check would prove nothing"
    for path, line, node in calls:
        hooks = {keyword.arg for keyword in node.keywords} & UNPACK_HOOKS
        assert not hooks, f"{path}:{line} unpacks with {hooks}"


class Booby:
    """Unpickling this calls trip(): the proof that something unpickled."""

    tripped: list[str] = []

    def __reduce__(self):
        return (Booby.tripped.append, ("unpickled!",))


def test_a_pickle_inside_a_frame_stays_bytes():
    import pickle  # the test builds the payload; the library never sees pickle

    payload = pickle.dumps(Booby())
    frame = frames.decode(msgpack.packb([int(frames.Kind.REQUEST), 1, 2.0, payload]))
    assert frame.payload == payload
    with pytest.raises(frames.FrameError):  # an extension value is not a field type
        frames.decode(
            msgpack.packb([int(frames.Kind.REQUEST), 1, 2.0, msgpack.ExtType(1, payload)])
        )
    assert Booby.tripped == []


# ---------------------------------------------------------------------------
# Oversized messages.


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def push_oversized(send: Callable[[bytes], object], header: bytes) -> int:
    """Send ``header``, announcing 100 MiB, then push its payload a MiB at a
    time until the peer hangs up; how many bytes of it went out."""
    pushed = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        send(header)
        while pushed < 100 * MiB:
            send(bytes(MiB))
            pushed += MiB
    return pushed


def test_relay_refuses_an_oversized_message_before_buffering_it(relay_factory, raw):
    """A header announcing 100 MiB to a relay that takes 1 MiB: closed on the
    length alone, however much of the payload the sender pushes after it."""
    relay = relay_factory("--max-message", "1MiB")
    before = rss(relay.proc.pid)
    peer = raw(relay.port).handshake()
    started = time.monotonic()
    peer.send_bytes(b"\x08\x05topic" + codec.encode_varint(100 * MiB))
    assert "exceeds the 1048576 limit" in peer.expect_eof(timeout=5)[-1].reason
    assert time.monotonic() - started < PROMPT

    # Pushing the payload anyway gets nowhere: the connection is gone.
    pusher = raw(relay.port).handshake()
    pushed = push_oversized(pusher.send_bytes, b"\x08\x05topic" + codec.encode_varint(100 * MiB))
    assert pushed < 16 * MiB  # socket buffers at most
    assert rss(relay.proc.pid) - before < 8 * MiB
    assert relay.proc.poll() is None


def test_binding_refuses_an_oversized_message_before_buffering_it():
    """The same from the other side: a relay announcing a 100 MiB reply
    (over the binding's 64 MiB limit) ends the connection, and the pending
    call fails at once instead of waiting for the payload."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    pushed = []

    def hostile_relay() -> None:
        sock, _ = listener.accept()
        with sock:
            sock.settimeout(5)
            decoder = codec.Decoder(codec.Side.CLIENT)
            packets = []
            while not any(type(p) is codec.RequestPacket for p in packets):
                data = sock.recv(1024)
                if not data:
                    return
                packets += decoder.feed(data)
                if packets and type(packets[0]) is codec.Init:
                    sock.sendall(codec.Accept().encode())
                    packets.pop(0)
            header = b"\x05\x00\x00\x01" + codec.encode_varint(100 * MiB)
            pushed.append(push_oversized(sock.sendall, header))

    thread = threading.Thread(target=hostile_relay, daemon=True)
    thread.start()
    before = rss(os.getpid())
    try:
        conn = iris.connect(port)
        started = time.monotonic()
        with pytest.raises(iris.ClosedError, match="exceeds"):
            conn.request("svc", b"give me everything", 10)
        assert time.monotonic() - started < PROMPT
        thread.join(5)
        assert pushed and pushed[0] < 16 * MiB
        assert rss(os.getpid()) - before < 16 * MiB
        wait_for(lambda: conn.closed, timeout=2)
    finally:
        listener.close()
