"""Bundle signatures: who packaged this bundle, not only whether it is self-consistent.

A manifest lists every file's SHA-256, so `verify` catches damage; but whoever edits a file can also
rewrite the manifest. `phiedge package --sign KEY` therefore writes a detached Ed25519 signature over
the exact bytes of `manifest.json`, as `manifest.json.minisig` beside it, and `verify --trust PUBKEY`
(also `run` and `bench`) refuses a bundle without one, one made with another key, or one whose manifest
changed after signing. The manifest names every other file's hash, so one signature covers them all.

Why the minisign format: the Ed25519 arithmetic and key encoding come from `cryptography` (its
Ed25519 keys load from and dump to raw bytes), and minisign's files are a thin, fixed layout around
those raw bytes (a key id, the signature, a signed "trusted comment"). Writing that layout, rather
than a format of our own or bare PEM keys, means anyone can check a bundle without phiedge:
`minisign -Vm manifest.json -p phiedge.pub` in the unpacked bundle, and a key made by
`minisign -G -W` works with `phiedge package --sign`. PEM keys from `openssl genpkey` have no standard
detached-signature file to go with them, and the key id is what lets an error say which key signed a
bundle. Sigstore signs with short-lived certificates from an online log and an identity provider:
more than a bundle checked offline on a device needs, and not checkable offline without its trust root.

What is supported: unencrypted minisign secret keys (what `minisign -G -W` and `phiedge keygen` write,
and what CI keeps in a secret store); a password-protected key is refused with a pointer, since its
scrypt parameters are libsodium's and a CI job has no one to type a password. Signatures are written in
minisign's default prehashed form (`ED`, Ed25519 over BLAKE2b-512 of the file); legacy `Ed` ones are
read too. Ed25519 signatures are deterministic and the comments are fixed, so a signed archive is as
byte-reproducible as an unsigned one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from phiedge.artifacts import MANIFEST, SIGNATURE
from phiedge.errors import KeyFileError, SignatureError
from phiedge.workspace import check_output

ALG, PREHASHED = b"Ed", b"ED"
KDF_NONE, KDF_SCRYPT, CHK_ALG = b"\0\0", b"Sc", b"B2"
PUBLIC_BYTES = 2 + 8 + 32  # alg, key id, key
SECRET_BYTES = 2 + 2 + 2 + 32 + 8 + 8 + 8 + 64 + 32  # alg, kdf, chk alg, salt, ops, mem, key id, key, checksum
UNTRUSTED, TRUSTED = "untrusted comment: ", "trusted comment: "
MAX_FILE = 1 << 16  # keys and signatures are a few hundred bytes; anything larger is not one


@dataclass(frozen=True)
class PublicKey:
    key_id: bytes
    key: Ed25519PublicKey

    @property
    def id(self) -> str:
        return key_id_text(self.key_id)

    def line(self) -> str:
        """The key as minisign prints it (`minisign -P` takes it): what a README or a CI variable quotes."""
        return base64.b64encode(ALG + self.key_id + self.key.public_bytes_raw()).decode()


@dataclass(frozen=True)
class SecretKey:
    key_id: bytes
    key: Ed25519PrivateKey

    @property
    def id(self) -> str:
        return key_id_text(self.key_id)

    def public(self) -> PublicKey:
        return PublicKey(self.key_id, self.key.public_key())


def key_id_text(key_id: bytes) -> str:
    """minisign prints a key id as the little-endian 64-bit number in hex."""
    return f"{int.from_bytes(key_id, 'little'):016X}"


def payload_line(text: str, where: str, kind: str) -> bytes:
    """The base64 line of a minisign key: the first line that is not a comment."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    body = [line for line in lines if not line.startswith(UNTRUSTED.strip())]
    try:
        return base64.b64decode(body[0], validate=True) if body else b""
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where}: not a minisign {kind} key (its key line is not base64)") from None


def read_key_file(path: str | Path, kind: str) -> str:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE:
            raise KeyFileError(f"{path}: not a minisign {kind} key ({path.stat().st_size} bytes)")
        return path.read_text()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {kind} key file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a folder, not a {kind} key file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the {kind} key ({getattr(exc, 'strerror', None) or exc})") from None


def load_secret(path: str | Path) -> SecretKey:
    """An unencrypted minisign secret key file (from `phiedge keygen` or `minisign -G -W`)."""
    raw = payload_line(read_key_file(path, "secret"), str(path), "secret")
    if len(raw) == PUBLIC_BYTES and raw[:2] == ALG:
        raise KeyFileError(f"{path}: is a public key; --sign needs the secret key (the .key file)")
    if len(raw) != SECRET_BYTES or raw[:2] != ALG or raw[4:6] != CHK_ALG:
        raise KeyFileError(f"{path}: not a minisign secret key")
    if raw[2:4] == KDF_SCRYPT:
        raise KeyFileError(f"{path}: is password-protected; phiedge signs with unencrypted keys "
                           "(`phiedge keygen`, or `minisign -G -W`) kept in a secret store")
    if raw[2:4] != KDF_NONE:
        raise KeyFileError(f"{path}: not a minisign secret key (unknown key protection {raw[2:4]!r})")
    key_id, secret, checksum = raw[54:62], raw[62:126], raw[126:158]
    # minisign leaves the checksum of an unencrypted key zero; a non-zero one must match.
    if checksum != bytes(32) and checksum != hashlib.blake2b(ALG + key_id + secret, digest_size=32).digest():
        raise KeyFileError(f"{path}: damaged secret key (its checksum does not match)")
    key = Ed25519PrivateKey.from_private_bytes(secret[:32])
    if key.public_key().public_bytes_raw() != secret[32:]:
        raise KeyFileError(f"{path}: damaged secret key (its two halves do not belong together)")
    return SecretKey(key_id, key)


def parse_public(raw: bytes, where: str) -> PublicKey:
    if len(raw) == SECRET_BYTES and raw[:2] == ALG:
        raise KeyFileError(f"{where}: is a secret key; --trust takes the public key (the .pub file). "
                           "Keep the secret key out of where bundles are checked")
    if len(raw) != PUBLIC_BYTES or raw[:2] != ALG:
        raise KeyFileError(f"{where}: not a minisign public key")
    return PublicKey(raw[2:10], Ed25519PublicKey.from_public_bytes(raw[10:]))


def load_public(spec: str | Path) -> PublicKey:
    """A minisign public key: a file (NAME.pub), the key line itself (`RW...`, as `minisign -P` takes it), or a
    .pub file's text (a CI variable holding the whole file)."""
    text = str(spec).strip()
    if "\n" in text:
        return parse_public(payload_line(text, "the --trust key", "public"), "the --trust key")
    path = Path(spec)
    if not path.exists() and text.startswith("RW") and len(text) == 56:
        try:
            return parse_public(base64.b64decode(text, validate=True), "the --trust key")
        except (binascii.Error, ValueError):
            pass
    if not path.exists():
        raise KeyFileError(f"{spec}: no such public key file (nor a minisign public key line, RW...)")
    return parse_public(payload_line(read_key_file(path, "public"), str(path), "public"), str(path))


def generate() -> SecretKey:
    return SecretKey(os.urandom(8), Ed25519PrivateKey.generate())


def secret_file(key: SecretKey) -> bytes:
    """minisign's unencrypted secret key layout (`minisign -G -W`): no KDF, zero salt, limits and checksum."""
    seed = key.key.private_bytes_raw()
    raw = ALG + KDF_NONE + CHK_ALG + bytes(48) + key.key_id + seed + key.key.public_key().public_bytes_raw()
    raw += bytes(32)
    return f"{UNTRUSTED}minisign secret key {key.id} (unencrypted: keep it secret)\n".encode() + \
        base64.b64encode(raw) + b"\n"


def public_file(key: PublicKey) -> bytes:
    return f"{UNTRUSTED}minisign public key {key.id}\n{key.line()}\n".encode()


def write_private(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole, with its mode from the start (a secret key is never readable by others)."""
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def keygen(out: str | Path, force: bool = False) -> dict:
    """Write OUT.key (secret, mode 0600) and OUT.pub; OUT may end in .key or .pub."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".key", ".pub") else out
    secret_path, public_path = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    for path in (secret_path, public_path):
        check_output(path, force)
    key = generate()
    write_private(secret_path, secret_file(key), 0o600)
    try:
        write_private(public_path, public_file(key.public()), 0o644)
    except KeyFileError:
        secret_path.unlink(missing_ok=True)  # a secret without its public half is of no use
        raise
    return {"secret_key": str(secret_path), "public_key": str(public_path), "key_id": key.id,
            "public_key_line": key.public().line()}


def sign(data: bytes, key: SecretKey, trusted_comment: str, untrusted_comment: str | None = None) -> bytes:
    """A minisign signature file for `data` (prehashed form), the same bytes on every call."""
    if "\n" in trusted_comment or "\r" in trusted_comment:
        raise SignatureError("a trusted comment is one line")
    signature = key.key.sign(hashlib.blake2b(data, digest_size=64).digest())
    comment = trusted_comment.encode()
    global_signature = key.key.sign(signature + comment)
    untrusted = untrusted_comment if untrusted_comment is not None else f"signature from phiedge secret key {key.id}"
    return (f"{UNTRUSTED}{untrusted}\n".encode() + base64.b64encode(PREHASHED + key.key_id + signature) + b"\n" +
            TRUSTED.encode() + comment + b"\n" + base64.b64encode(global_signature) + b"\n")


@dataclass(frozen=True)
class Signature:
    alg: bytes
    key_id: bytes
    signature: bytes
    trusted_comment: bytes
    global_signature: bytes


def parse_signature(blob: bytes, where: str) -> Signature:
    try:
        lines = blob.decode().splitlines()
        if len(lines) < 4 or not lines[0].startswith(UNTRUSTED) or not lines[2].startswith(TRUSTED):
            raise ValueError
        head = base64.b64decode(lines[1], validate=True)
        tail = base64.b64decode(lines[3], validate=True)
    except (UnicodeDecodeError, binascii.Error, ValueError):
        raise SignatureError(f"{where}: not a minisign signature") from None
    if len(head) != 74 or head[:2] not in (ALG, PREHASHED) or len(tail) != 64:
        raise SignatureError(f"{where}: not a minisign signature")
    return Signature(head[:2], head[2:10], head[10:], lines[2][len(TRUSTED):].encode(), tail)


def check(data: bytes, blob: bytes, key: PublicKey, what: str, where: str) -> str:
    """Raise SignatureError unless `blob` is `key`'s signature of `data`; return the trusted comment."""
    sig = parse_signature(blob, where)
    if sig.key_id != key.key_id:
        raise SignatureError(f"{what} is signed by key {key_id_text(sig.key_id)}, not by the trusted key {key.id}")
    message = hashlib.blake2b(data, digest_size=64).digest() if sig.alg == PREHASHED else data
    try:
        key.key.verify(sig.signature, message)
    except InvalidSignature:
        raise SignatureError(f"{what} does not match its signature by key {key.id} "
                             "(changed after signing, or the signature is damaged)") from None
    try:
        key.key.verify(sig.global_signature, sig.signature + sig.trusted_comment)
    except InvalidSignature:
        raise SignatureError(f"{where}: the signature's trusted comment was altered") from None
    return sig.trusted_comment.decode()


def read_signature(path: Path) -> bytes | None:
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_FILE:
        raise SignatureError(f"{path.name}: not a minisign signature ({path.stat().st_size} bytes)")
    return path.read_bytes()


def check_bundle(root: Path, manifest: bytes | None, trust: PublicKey | None, name: str = MANIFEST) -> dict:
    """What verify reports about a bundle's signature; with a trusted key, refuse anything but its signature.

    `manifest` is the manifest's bytes as read once by the caller, who parses those same bytes."""
    blob = read_signature(root / SIGNATURE)
    if trust is None:
        if blob is None:
            return {"status": "unsigned"}
        try:
            signer = key_id_text(parse_signature(blob, SIGNATURE).key_id)
        except SignatureError:
            signer = None
        return {"status": "not checked", "key_id": signer,
                "note": "the bundle carries a signature, not checked: give --trust PUBKEY to check it"}
    if manifest is None:
        raise SignatureError(f"{root}: no {name}, so nothing signed (--trust checks signed bundles)")
    if blob is None:
        raise SignatureError(f"the bundle is not signed (no {SIGNATURE}), and --trust {trust.id} wants it signed")
    comment = check(manifest, blob, trust, name, SIGNATURE)
    return {"status": "verified", "key_id": trust.id, "trusted_comment": comment}
