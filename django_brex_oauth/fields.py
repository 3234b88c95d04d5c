"""Encrypted model fields for tokens, with key rotation.

Built on django-cryptography: values are pickled, encrypted with AES-CBC and signed
with HMAC-SHA256 by its ``FernetBytes``/``FernetSigner``. Unlike its default field,
both the cipher and the signing key here come from ``BREX_OAUTH["ENCRYPTION_KEY"]``
(never from ``SECRET_KEY`` alone), are read when used rather than at import, and
older keys in ``ENCRYPTION_KEY_FALLBACKS`` still decrypt, so the key can be rotated
without losing a token (``manage.py brex_oauth_rotate_key`` re-encrypts every row
with the current key).
"""

from __future__ import annotations

import functools
from typing import Any

from django.db import models
from django.utils.encoding import force_bytes
from django_cryptography.core.signing import BadSignature, FernetSigner
from django_cryptography.fields import EncryptedMixin
from django_cryptography.utils.crypto import FernetBytes, InvalidToken, pbkdf2

from .conf import brex_settings

_KDF_SALT = b"django-brex-oauth token encryption v1"
_KDF_ITERATIONS = 100_000


class UndecryptableValue(Exception):
    """A stored token could not be decrypted with any configured key."""


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


class EncryptedTextField(EncryptedMixin, models.TextField):
    """A text field stored encrypted; only ``isnull`` lookups work on it."""

    base_class = models.TextField
    wasinstance = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fernet = RotatingFernet()

    def deconstruct(self) -> tuple[str, str, Any, Any]:
        name, _path, args, kwargs = models.TextField.deconstruct(self)
        return name, "django_brex_oauth.fields.EncryptedTextField", args, kwargs

    def clone(self) -> EncryptedTextField:
        name, path, args, kwargs = self.deconstruct()
        return self.__class__(*args, **kwargs)
