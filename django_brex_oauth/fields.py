"""Encrypted model fields for tokens, with key rotation.

Built on django-cryptography's ``FernetBytes``/``FernetSigner`` primitives: each value is
encrypted with AES-CBC and signed with HMAC-SHA256. Unlike django-cryptography's own
field, nothing is pickled: the plaintext is a format byte followed by the token's UTF-8
text, so reading a row can only ever produce a string, whatever a forged ciphertext holds.
Rows written by earlier versions hold a pickled string; they are still read, by a decoder
that accepts a pickled string and nothing else and never runs the unpickler
(``manage.py brex_oauth_rotate_key`` rewrites them in the current format).

Both the cipher and the signing key come from ``BREX_OAUTH["ENCRYPTION_KEY"]`` (never from
``SECRET_KEY`` alone), are read when used rather than at import, and older keys in
``ENCRYPTION_KEY_FALLBACKS`` still decrypt, so the key can be rotated without losing a
token (``manage.py brex_oauth_rotate_key`` re-encrypts every row with the current key).

Serialised (``dumpdata``), a value is written as ciphertext, ``brex-oauth-encrypted:``
followed by URL-safe base64; ``loaddata`` decrypts it with the current or a fallback key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import pickletools
from typing import Any

from django.db import models
from django.utils.encoding import force_bytes
from django_cryptography.core.signing import BadSignature, FernetSigner
from django_cryptography.fields import EncryptedMixin
from django_cryptography.utils.crypto import FernetBytes, InvalidToken, pbkdf2

from .conf import brex_settings

_KDF_SALT = b"django-brex-oauth token encryption v1"
_KDF_ITERATIONS = 100_000

#: First byte of the plaintext of a value in the current format: UTF-8 text follows.
TEXT_FORMAT = b"\x01"
#: First byte of a value written by earlier versions: pickle's PROTO opcode.
_LEGACY_PICKLE = b"\x80"
#: The pickle opcodes a pickled ``str`` is made of, besides the string itself.
_LEGACY_FRAMING = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_LEGACY_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})

#: How a serialised (``dumpdata``) value starts; the rest is URL-safe base64 ciphertext.
SERIALISED_PREFIX = "brex-oauth-encrypted:"


class UndecryptableValue(Exception):
    """A stored token could not be decrypted with any configured key, or its decrypted
    content is not a token in a known format."""


@functools.lru_cache(maxsize=16)
def _fernet_for(key: str) -> FernetBytes:
    # One derivation gives independent cipher and signing keys; PBKDF2 is slow on
    # purpose, so each key is derived once per process.
    material = pbkdf2(force_bytes(key), _KDF_SALT, _KDF_ITERATIONS, dklen=64)
    return FernetBytes(material[32:], FernetSigner(material[:32]))


class RotatingFernet:
    """Encrypts with the current key and decrypts with the current or any fallback key."""

    def encrypt(self, data: bytes) -> bytes:
        return _fernet_for(brex_settings.encryption_keys[0]).encrypt(data)

    def decrypt(self, data: bytes, ttl: int | None = None) -> bytes:
        for key in brex_settings.encryption_keys:
            try:
                return _fernet_for(key).decrypt(data, ttl)
            except (BadSignature, InvalidToken):
                continue
        raise UndecryptableValue(
            "A stored Brex token cannot be decrypted with BREX_OAUTH['ENCRYPTION_KEY'] or "
            "any of BREX_OAUTH['ENCRYPTION_KEY_FALLBACKS']."
        )

    def decrypts_with_current_key(self, data: bytes) -> bool:
        try:
            _fernet_for(brex_settings.encryption_keys[0]).decrypt(data)
        except (BadSignature, InvalidToken):
            return False
        return True


def encode_text(value: str) -> bytes:
    """The plaintext stored for ``value``: the format byte, then its UTF-8 text."""
    return TEXT_FORMAT + value.encode("utf-8")


def decode_text(plaintext: bytes) -> str:
    """The string held by a decrypted value, current or legacy format.

    Raises :class:`UndecryptableValue` for anything else: in particular a pickle that would
    build any object but a string is refused without being run.
    """
    if plaintext[:1] == TEXT_FORMAT:
        try:
            return plaintext[1:].decode("utf-8")
        except UnicodeDecodeError as err:
            raise UndecryptableValue("A stored Brex token is not valid UTF-8.") from err
    if plaintext[:1] == _LEGACY_PICKLE:
        return _decode_legacy_pickle(plaintext)
    raise UndecryptableValue("A stored Brex token is in an unknown format.")


def _decode_legacy_pickle(data: bytes) -> str:
    # pickletools only parses the opcodes; no object is built and no callable is looked up,
    # so a forged pickle (one that calls a function through GLOBAL/REDUCE) is refused here
    # rather than run.
    refused = UndecryptableValue(
        "A stored Brex token in the earlier pickled format holds something other than a "
        "string; it was not unpickled."
    )
    strings: list[str] = []
    try:
        for opcode, arg, position in pickletools.genops(data):
            if opcode.name in _LEGACY_FRAMING:
                continue
            if opcode.name in _LEGACY_STRINGS and isinstance(arg, str):
                strings.append(arg)
            elif opcode.name == "STOP" and position == len(data) - 1:
                break
            else:
                raise refused
        else:
            raise refused
    except ValueError as err:  # truncated or malformed opcodes
        raise refused from err
    if len(strings) != 1:
        raise refused
    return strings[0]


class EncryptedTextField(EncryptedMixin, models.TextField):
    """A text field stored encrypted; only ``isnull`` lookups work on it.

    Values are strings; serialisers write them as ciphertext (see the module docstring).
    """

    base_class = models.TextField
    wasinstance = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Used instead of the mixin's ``_fernet`` (keyed from SECRET_KEY), which nothing
        # reaches: _dump and _load, the only code that encrypts or decrypts, are these.
        self._cipher = RotatingFernet()

    def _dump(self, value: Any) -> bytes:
        return self._cipher.encrypt(encode_text(str(value)))

    def _load(self, value: bytes) -> str:
        return decode_text(self._cipher.decrypt(value))

    def value_to_string(self, obj: models.Model) -> str:
        """Ciphertext under the current key, for ``dumpdata``: never the token itself.

        ``""`` when there is no token, as Django's own fields do; the serialisers write
        ``null`` for a null value without asking the field.
        """
        value = self.value_from_object(obj)
        if value is None:
            return ""
        return SERIALISED_PREFIX + base64.urlsafe_b64encode(self._dump(value)).decode("ascii")

    def to_python(self, value: Any) -> Any:
        """The token for a serialised value (``loaddata``); any other value as it is."""
        if isinstance(value, str) and value.startswith(SERIALISED_PREFIX):
            try:
                ciphertext = base64.urlsafe_b64decode(value[len(SERIALISED_PREFIX):])
            except (binascii.Error, ValueError) as err:
                raise UndecryptableValue("A serialised Brex token is not valid base64.") from err
            return self._load(ciphertext)
        return super().to_python(value)

    def deconstruct(self) -> tuple[str, str, Any, Any]:
        name, _path, args, kwargs = models.TextField.deconstruct(self)
        return name, "django_brex_oauth.fields.EncryptedTextField", args, kwargs

    def clone(self) -> EncryptedTextField:
        name, path, args, kwargs = self.deconstruct()
        return self.__class__(*args, **kwargs)
