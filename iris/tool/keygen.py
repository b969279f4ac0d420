"""``iris keygen``: the RSA key of an Iris network, in the one format the node reads.

Every node of a multi-machine deployment (``iris -net NAME -rsa KEY``) loads
the same private key; it authenticates the nodes to each other and keys the
encryption between them. The Go node accepts only PKCS#1 ("BEGIN RSA PRIVATE
KEY"); PKCS#8, what OpenSSL 3 writes by default, is rejected. See
docs/deploy-multi-machine.md.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .exits import Exit, ToolError
from .messaging import note, write_out

# What the node's -dev mode generates, and the least we accept for a network secret.
DEFAULT_BITS = 2048
MIN_BITS = 2048
# Past this, generating takes minutes to hours (100000 bits never finished);
# the node's own keys are 2048 bits.
MAX_BITS = 16384
KEY_MODE = 0o600  # a secret: owner read/write only


def generate(bits: int) -> bytes:
    """A new private key as unencrypted PKCS#1 PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1 for RSA keys
        encryption_algorithm=serialization.NoEncryption(),
    )


def write_secret(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte, atomically.

    The key goes to a new temporary file in the same directory, created with
    mode 0600 (so it is never readable by others, whatever the umask), then is
    linked into place: ``link`` fails if ``path`` exists, ``replace`` (only
    with ``overwrite``) swaps it in. A reader never sees a partial key.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), KEY_MODE)  # the umask may have removed owner bits
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def run(output: str | None, bits: int, force: bool) -> Exit:
    if output is None:
        write_out(generate(bits))
        return Exit.OK
    path = Path(output)
    if path.is_dir():  # else the temporary file's name, or the link, fails obscurely
        raise ToolError(Exit.FAILURE, f"cannot write {path}: it is a directory")
    try:
        write_secret(path, generate(bits), force)
    except FileExistsError as err:
        raise ToolError(Exit.FAILURE, f"{path} exists; use --force to replace it") from err
    except OSError as err:
        raise ToolError(Exit.FAILURE, f"cannot write {path}: {err.strerror or err}") from err
    note(f"wrote a {bits}-bit network key to {path} (mode 0600)")
    return Exit.OK
