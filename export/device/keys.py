"""Bundle keys: an Ed25519 signing key for manifests and a secret for per-user CDN paths.

Devices ship with the public key and verify every manifest; the path secret stays on the
backend, which hands each device its token at login, so a CDN path names a user without
revealing who (HMAC-SHA256 is a PRF: without the secret, tokens cannot be linked to ids).
All cryptography is the `cryptography` package's; nothing here is hand-written.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["KeysError", "BundleKeys", "KEY_FILE", "PUB_FILE", "SECRET_FILE", "keygen", "load_keys", "user_token", "key_id",
           "verify_signature"]

KEY_FILE, PUB_FILE, SECRET_FILE = "signing.key", "signing.pub", "path.secret"
SECRET_BYTES = 32


class KeysError(ValueError):
    """A key folder that cannot be used (missing, malformed, wrong type, unsafe permissions)."""


@dataclass(frozen=True)
class BundleKeys:
    private_key: Ed25519PrivateKey
    public_pem: bytes
    path_secret: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def token(self, user_id: int) -> str:
        return user_token(self.path_secret, user_id)


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def user_token(secret: bytes, user_id: int) -> str:
    """HMAC-SHA256(path.secret, decimal user id): the user's path component on the CDN."""
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        raise ValueError(f"user id must be an int, got {user_id!r}")
    if user_id < 0:
        raise ValueError(f"user id must be >= 0, got {user_id}")
    return hmac.new(secret, str(user_id).encode("ascii"), hashlib.sha256).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by umask and ignored for an existing file


def keygen(out: str | os.PathLike[str], *, force: bool = False) -> BundleKeys:
    """Write signing.key (0600), signing.pub and path.secret (0600) into `out`.

    Refuses to replace existing keys unless `force`: a lost signing key orphans every device
    that trusts it, and a new path secret moves every user's files."""
    out = Path(out)
    existing = [n for n in (KEY_FILE, PUB_FILE, SECRET_FILE) if (out / n).exists()]
    if existing and not force:
        raise KeysError(f"--out: {out} already holds {', '.join(existing)}; pass --force to replace them "
                        "(devices that trust the old public key will refuse bundles signed by the new one)")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    secret = os.urandom(SECRET_BYTES)
    _write_private(out / KEY_FILE, pem)
    _write_private(out / SECRET_FILE, secret)
    (out / PUB_FILE).write_bytes(pub)
    return BundleKeys(key, pub, secret)


def load_keys(keydir: str | os.PathLike[str]) -> BundleKeys:
    """The keys in `keydir`, checked: Ed25519, the public key matching the private one, a
    32-byte secret, private files not readable by others."""
    d = Path(keydir)
    if not d.is_dir():
        raise KeysError(f"--keys: {d} is not a folder (make one with `parity export keygen --out {d}`)")
    for n in (KEY_FILE, PUB_FILE, SECRET_FILE):
        if not (d / n).is_file():
            raise KeysError(f"--keys: {d} has no {n} (make keys with `parity export keygen --out DIR`)")
    for n in (KEY_FILE, SECRET_FILE):
        if (d / n).stat().st_mode & 0o077:
            raise KeysError(f"--keys: {d / n} is readable by group or others (mode {oct((d / n).stat().st_mode & 0o777)}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key((d / KEY_FILE).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeysError(f"--keys: {d / KEY_FILE} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError(f"--keys: {d / KEY_FILE} is a {type(key).__name__}, not an Ed25519 key")
    pub_pem = (d / PUB_FILE).read_bytes()
    try:
        pub = serialization.load_pem_public_key(pub_pem)
    except ValueError as exc:
        raise KeysError(f"--keys: {d / PUB_FILE} is not a PEM public key ({exc})") from None
    if not isinstance(pub, Ed25519PublicKey) or key_id(pub) != key_id(key.public_key()):
        raise KeysError(f"--keys: {d / PUB_FILE} is not the public half of {d / KEY_FILE}")
    secret = (d / SECRET_FILE).read_bytes()
    if len(secret) != SECRET_BYTES:
        raise KeysError(f"--keys: {d / SECRET_FILE} holds {len(secret)} bytes, expected {SECRET_BYTES}")
    return BundleKeys(key, pub_pem, secret)


def verify_signature(public_pem: bytes, signature: bytes, data: bytes) -> bool:
    pub = serialization.load_pem_public_key(public_pem)
    if not isinstance(pub, Ed25519PublicKey):
        return False
    try:
        pub.verify(signature, data)
    except InvalidSignature:
        return False
    return True
