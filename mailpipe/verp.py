"""Signed return paths (VERP) and unsubscribe tokens: what comes back names its tenant, mail and
recipient, and nobody else can make one.

**The return path** of a mail to one recipient is ``b<58 characters>@<return-path domain>``: 59
characters of lowercase base32 in the local part (SMTP allows 64), holding 36 bytes:

    key id (1) | flags (1: job hashed, shared server) | day issued (2, Unix days)
    | tenant tag (4: SHA-256 of the tenant's name) | job (16: its 32 hex digits, or SHA-256 of it)
    | recipient tag (4: HMAC of tenant and address) | MAC (8: HMAC-SHA256 of all the above,
      the kind and the tenant's full name)

The recipient is not in it, in clear or as a plain hash a dictionary could reverse: only a
keyed tag, so a report that names an address is applied to that address only if the tag says
the mail went to it. A token is valid ``verp_valid_days`` (30) after it was issued. Keys rotate
by id: the first of ``MAILPIPE_VERP_KEYS`` signs, every one listed verifies.

The same local part with ``u`` for ``b`` is the ``mailto:`` unsubscribe address; the HTTPS
unsubscribe link carries a longer token (:func:`Signer.link_token`) that holds the tenant, job
and recipient themselves, encrypted (deterministic authenticated encryption: SIV with
HMAC-SHA256), since a one-click POST names nothing else.

Verification returns the token's fields (``Token``) or why not (``Invalid``), never raises on
input: the inbound stage calls it on whatever an SMTP client sends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mailpipe.errors import ConfigError
from mailpipe.settings import Settings

BOUNCE, UNSUBSCRIBE = "b", "u"
KINDS = (BOUNCE, UNSUBSCRIBE)
_COMPACT = struct.Struct(">BBH4s16s4s")  # key, flags, day, tenant tag, job, recipient tag
_MAC_BYTES = 8
_TOKEN_BYTES = _COMPACT.size + _MAC_BYTES  # 36
LOCAL_PART_LENGTH = 1 + 58  # the kind, then 36 bytes of base32 without padding
_JOB_HASHED, _SHARED = 1, 2
_HEX32 = re.compile(r"[0-9a-f]{32}")
# Base32 (RFC 4648, lowercase) read as one integer: the standard library's b32decode is a loop in
# Python, half of a verification's time. ASCII only: the dotless i (U+0131) is "I" in upper case,
# so b32decode took a look-alike of a token for the token, under another id (its replay mark).
_BASE32 = re.compile(r"[a-z2-7]{58}")
_BASE32_DIGITS = str.maketrans("abcdefghijklmnopqrstuvwxyz234567", "0123456789abcdefghijklmnopqrstuv")
_LINK_HEADER = struct.Struct(">BBHB")  # version, key, day, flags
_LINK_VERSION = 1
_SIV_BYTES = 16
MIN_SECRET_CHARS = 16
DAY_S = 86400


def today() -> int:
    return int(time.time() // DAY_S)


@dataclass(frozen=True)
class Keys:
    """Signing keys by id; ``current`` signs."""

    current: int
    secrets: dict[int, bytes] = field(repr=False)

    @classmethod
    def parse(cls, text: str, where: str) -> Keys:
        """``"id:secret,id:secret"`` (or one per line); the first signs. A mistake names ``where``
        and the entry's position, never the secret."""
        secrets: dict[int, bytes] = {}
        current: int | None = None
        entries = [e.strip() for e in re.split(r"[,\n]", text) if e.strip()]
        for i, entry in enumerate(entries):
            key_id, sep, secret = entry.partition(":")
            if not sep or not key_id.strip().isdigit() or not 0 <= int(key_id) <= 255:
                raise ConfigError(f"{where}: entry {i + 1} is not \"id:secret\" with an id from 0 to 255")
            if len(secret) < MIN_SECRET_CHARS:
                raise ConfigError(f"{where}: key {int(key_id)} is shorter than {MIN_SECRET_CHARS} characters")
            if int(key_id) in secrets:
                raise ConfigError(f"{where}: key id {int(key_id)} is given twice")
            secrets[int(key_id)] = secret.encode()
            current = int(key_id) if current is None else current
        if current is None:
            raise ConfigError(f"{where}: no key given")
        return cls(current=current, secrets=secrets)

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys | None:
        """The keys of ``MAILPIPE_VERP_KEYS`` or ``MAILPIPE_VERP_KEYS_FILE``; None when neither is
        set (no signed return paths, and the inbound stage accepts no report)."""
        if settings.verp_keys and settings.verp_keys_file:
            raise ConfigError("MAILPIPE_VERP_KEYS and MAILPIPE_VERP_KEYS_FILE: give one, not both")
        if settings.verp_keys:
            return cls.parse(settings.verp_keys, "MAILPIPE_VERP_KEYS")
        if settings.verp_keys_file:
            try:
                text = Path(settings.verp_keys_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"MAILPIPE_VERP_KEYS_FILE: cannot read {settings.verp_keys_file!r}: "
                                  f"{exc.strerror}") from None
            return cls.parse(text, "MAILPIPE_VERP_KEYS_FILE")
        return None


@dataclass(frozen=True)
class Token:
    """What a valid token says. ``job_id`` is None when the job's id was not 32 hex digits (the
    token then holds its hash, ``job_hash``: ``names_job`` checks a candidate)."""

    kind: str
    tenant: str
    job_id: str | None
    job_hash: bytes
    recipient_tag: bytes
    shared: bool
    issued_day: int
    key_id: int
    local_part: str
    recipient: str | None = None  # known from an unsubscribe link, which holds it

    @property
    def id(self) -> str:
        """A stable name for this token (replay marks), without the token itself."""
        return hashlib.sha256(self.local_part.encode()).hexdigest()[:32]

    def names_job(self, candidate: str) -> bool:
        return _job_bytes(candidate)[1] == self.job_hash


@dataclass(frozen=True)
class Invalid:
    """Why a token was refused."""

    reason: str


class Signer:
    def __init__(self, keys: Keys, *, valid_days: int = 30, link_valid_days: int = 60) -> None:
        self.keys = keys
        self.valid_days = valid_days
        self.link_valid_days = link_valid_days
        self._derived = {key_id: (_derive(secret, b"mailpipe token mac"), _derive(secret, b"mailpipe token enc"))
                         for key_id, secret in keys.secrets.items()}
        # The tenants of a token's tag, per tenants tuple asked about (the servers file's, each
        # reload a new one): a verification is then one lookup, not a hash of every tenant's name.
        self._by_tag: dict[int, tuple[Collection[str], dict[bytes, list[str]]]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Signer | None:
        keys = Keys.from_settings(settings)
        if keys is None:
            return None
        return cls(keys, valid_days=settings.verp_valid_days, link_valid_days=settings.unsubscribe_valid_days)

    # -- making ---------------------------------------------------------------------------------

    def local_part(self, kind: str, tenant: str, job_id: str, recipient: str, *, shared: bool = False,
                   day: int | None = None) -> str:
        """The ``b...`` (return path) or ``u...`` (mailto unsubscribe) local part."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        key_id = self.keys.current
        mac_key, _ = self._derived[key_id]
        hashed, job = _job_bytes(job_id)
        flags = (_JOB_HASHED if hashed else 0) | (_SHARED if shared else 0)
        body = _COMPACT.pack(key_id, flags, today() if day is None else day, _tenant_tag(tenant), job,
                             _recipient_tag(mac_key, tenant, recipient))
        mac = _mac(mac_key, kind.encode() + body + tenant.encode())[:_MAC_BYTES]
        return kind + base64.b32encode(body + mac).decode().rstrip("=").lower()

    def return_path(self, tenant: str, job_id: str, recipient: str, domain: str, *, shared: bool = False) -> str:
        return f"{self.local_part(BOUNCE, tenant, job_id, recipient, shared=shared)}@{domain}"

    def link_token(self, tenant: str, job_id: str, recipient: str, *, day: int | None = None) -> str:
        """The unsubscribe link's token: tenant, job and recipient, encrypted and authenticated."""
        key_id = self.keys.current
        mac_key, enc_key = self._derived[key_id]
        header = _LINK_HEADER.pack(_LINK_VERSION, key_id, today() if day is None else day, 0)
        plain = "\0".join((tenant, job_id, recipient.lower())).encode()
        siv = _mac(mac_key, header + plain)[:_SIV_BYTES]
        sealed = bytes(a ^ b for a, b in zip(plain, _keystream(enc_key, siv, len(plain)), strict=True))
        return base64.urlsafe_b64encode(header + siv + sealed).decode().rstrip("=")

    # -- checking -------------------------------------------------------------------------------

    def verify(self, local_part: str, tenants: Iterable[str], *, now_day: int | None = None) -> Token | Invalid:
        """The fields of a ``b``/``u`` local part, if one of ``tenants`` signed it with a key we
        have, within its validity; else why not."""
        local = local_part.strip().lower()
        if len(local) != LOCAL_PART_LENGTH or local[0] not in KINDS:
            return Invalid("not a mailpipe token")
        if not _BASE32.fullmatch(local, 1):
            return Invalid("not a mailpipe token (not base32)")
        # 58 digits of 5 bits: the 36 bytes, then 2 bits of padding.
        raw = (int(local[1:].translate(_BASE32_DIGITS), 32) >> 2).to_bytes(_TOKEN_BYTES, "big")
        body, mac = raw[:_COMPACT.size], raw[_COMPACT.size:]
        key_id, flags, day, tenant_tag, job, recipient_tag = _COMPACT.unpack(body)
        if key_id not in self._derived:
            return Invalid(f"signed with key {key_id}, which is not (or no longer) configured")
        expired = self._expired(day, self.valid_days, now_day)
        if expired:
            return expired
        mac_key, _ = self._derived[key_id]
        for tenant in self._tagged(tenant_tag, tenants):
            expected = _mac(mac_key, local[0].encode() + body + tenant.encode())[:_MAC_BYTES]
            if hmac.compare_digest(expected, mac):
                hashed = bool(flags & _JOB_HASHED)
                return Token(kind=local[0], tenant=tenant, job_id=None if hashed else job.hex(), job_hash=job,
                             recipient_tag=recipient_tag, shared=bool(flags & _SHARED), issued_day=day,
                             key_id=key_id, local_part=local)
        return Invalid("bad signature (forged, or for a tenant that no longer exists)")

    def verify_link(self, token: str, *, now_day: int | None = None) -> Token | Invalid:
        """The fields of an unsubscribe link's token, or why not."""
        try:
            raw = base64.urlsafe_b64decode(token.strip() + "=" * (-len(token.strip()) % 4))
        except (binascii.Error, ValueError):
            return Invalid("not a mailpipe link (not base64url)")
        if len(raw) < _LINK_HEADER.size + _SIV_BYTES + 5:
            return Invalid("not a mailpipe link (too short)")
        header, siv, sealed = raw[:_LINK_HEADER.size], raw[_LINK_HEADER.size:_LINK_HEADER.size + _SIV_BYTES], \
            raw[_LINK_HEADER.size + _SIV_BYTES:]
        version, key_id, day, _flags = _LINK_HEADER.unpack(header)
        if version != _LINK_VERSION:
            return Invalid(f"unknown link version {version}")
        if key_id not in self._derived:
            return Invalid(f"signed with key {key_id}, which is not (or no longer) configured")
        mac_key, enc_key = self._derived[key_id]
        plain = bytes(a ^ b for a, b in zip(sealed, _keystream(enc_key, siv, len(sealed)), strict=True))
        if not hmac.compare_digest(_mac(mac_key, header + plain)[:_SIV_BYTES], siv):
            return Invalid("bad signature (forged or altered)")
        expired = self._expired(day, self.link_valid_days, now_day)
        if expired:
            return expired
        fields = plain.decode("utf-8", "replace").split("\0")
        if len(fields) != 3:
            return Invalid("not a mailpipe link (malformed)")
        tenant, job_id, recipient = fields
        _hashed, job = _job_bytes(job_id)
        return Token(kind=UNSUBSCRIBE, tenant=tenant, job_id=job_id, job_hash=job,
                     recipient_tag=_recipient_tag(mac_key, tenant, recipient), shared=False, issued_day=day,
                     key_id=key_id, local_part=token.strip()[:120], recipient=recipient)

    def _tagged(self, tag: bytes, tenants: Iterable[str]) -> Iterable[str]:
        """The ``tenants`` whose tag is ``tag``, in their order."""
        if not isinstance(tenants, tuple | frozenset):  # may change: asked afresh
            return [tenant for tenant in tenants if _tenant_tag(tenant) == tag]
        known = self._by_tag.get(id(tenants))
        if known is None or known[0] is not tenants:
            index: dict[bytes, list[str]] = {}
            for tenant in tenants:
                index.setdefault(_tenant_tag(tenant), []).append(tenant)
            if len(self._by_tag) >= 8:  # the current servers file's, and a few just replaced
                self._by_tag.clear()
            known = self._by_tag[id(tenants)] = (tenants, index)
        return known[1].get(tag, ())

    def names_recipient(self, token: Token, address: str) -> bool:
        """Whether the mail of ``token`` went to ``address`` (any case)."""
        mac_key, _ = self._derived[token.key_id]
        return hmac.compare_digest(_recipient_tag(mac_key, token.tenant, address), token.recipient_tag)

    @staticmethod
    def _expired(day: int, valid_days: int, now_day: int | None) -> Invalid | None:
        current = today() if now_day is None else now_day
        if day > current + 1:
            return Invalid("issued in the future")
        if current - day > valid_days:
            return Invalid(f"expired ({current - day} days old, valid {valid_days})")
        return None


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, label, hashlib.sha256).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _keystream(key: bytes, siv: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += _mac(key, siv + counter.to_bytes(4, "big"))
        counter += 1
    return bytes(out[:length])


def _tenant_tag(tenant: str) -> bytes:
    return hashlib.sha256(tenant.encode()).digest()[:4]


def _recipient_tag(mac_key: bytes, tenant: str, recipient: str) -> bytes:
    return _mac(mac_key, b"rcpt\0" + tenant.encode() + b"\0" + recipient.strip().lower().encode())[:4]


def _job_bytes(job_id: str) -> tuple[bool, bytes]:
    """(hashed?, 16 bytes): a job id of 32 hex digits as itself, any other as its SHA-256."""
    if _HEX32.fullmatch(job_id):
        return False, bytes.fromhex(job_id)
    return True, hashlib.sha256(job_id.encode()).digest()[:16]


def xtext(value: str) -> str:
    """RFC 3461 xtext, for ENVID and ORCPT: '+', '=' and anything outside ! to ~ as +HH."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
                   for c in value)
