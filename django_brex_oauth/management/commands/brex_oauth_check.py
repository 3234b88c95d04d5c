"""Check the BREX_OAUTH configuration against Brex's live discovery document."""

from __future__ import annotations

from django.core.checks import ERROR
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from django_brex_oauth import discovery, oauth
from django_brex_oauth.checks import check_settings
from django_brex_oauth.conf import brex_settings
from django_brex_oauth.exceptions import BrexOAuthError, InvalidClient, TokenError
from django_brex_oauth.services import throttle


class Command(BaseCommand):
    help = (
        "Validate BREX_OAUTH against the issuer's live OpenID configuration and JWKS: "
        "endpoints, PKCE S256, RS256 id_tokens and client_secret_post authentication, and "
        "whether the token endpoint accepts the client id and secret. While Brex refuses "
        "them, refreshing stays paused and this command fails; once they work, running it "
        "ends the pause."
    )
    # The command reports the BREX_OAUTH checks itself (once, and as a CommandError).
    requires_system_checks: list[str] = []

    def handle(self, *args, **options):
        self._check_settings()
        self.stdout.write(f"environment:  {brex_settings.environment}")
        self.stdout.write(f"issuer:       {brex_settings.issuer}")
        self.stdout.write(f"API server:   {brex_settings.api_base_url}")
        self.stdout.write(f"scopes:       {' '.join(brex_settings.scopes)}")
        try:
            metadata = discovery.get_provider_metadata(force_refresh=True)
            jwks = discovery.get_jwks(force_refresh=True)
        except BrexOAuthError as err:
            raise CommandError(f"Discovery failed: {err}") from err
        problems = [
            *self._discovery_problems(metadata),
            *self._signing_key_problems(jwks),
            *self._client_problems(),
            *self._pause_problems(),
        ]
        if problems:
            raise CommandError("Brex configuration problems:\n  " + "\n  ".join(problems))
        self.stdout.write(self.style.SUCCESS("Brex OAuth configuration OK."))

    def _check_settings(self) -> None:
        """The BREX_OAUTH system checks: warnings printed, errors raised together."""
        problems: list[str] = []
        for message in check_settings():
            line = f"{message.id}: {message.msg}"
            if message.level >= ERROR:
                problems.append(line)
            else:
                self.stdout.write(self.style.WARNING(f"warning {line}"))
        if problems:
            raise CommandError("Configuration errors:\n  " + "\n  ".join(problems))

    def _discovery_problems(self, metadata: dict) -> list[str]:
        """Prints the endpoints; what the discovery document lacks that the app needs."""
        problems: list[str] = []
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri",
                     "revocation_endpoint", "userinfo_endpoint"):
            value = metadata.get(name)
            if value:
                self.stdout.write(f"{name + ':':<25} {value}")
            else:
                problems.append(f"the discovery document has no {name}")

        def supports(key: str, value: str) -> None:
            advertised = metadata.get(key)
            if advertised is not None and value not in advertised:
                problems.append(f"{key} is {advertised}, without {value!r}")

        supports("code_challenge_methods_supported", "S256")
        supports("token_endpoint_auth_methods_supported", "client_secret_post")
        supports("response_types_supported", "code")
        for alg in brex_settings.ID_TOKEN_ALGORITHMS:
            supports("id_token_signing_alg_values_supported", alg)
        return problems

    def _signing_key_problems(self, jwks: dict) -> list[str]:
        usable = [k for k in jwks["keys"] if k.get("kty") == "RSA" and k.get("use", "sig") == "sig"]
        if not usable:
            return ["the JWKS holds no RSA signing key"]
        kids = ", ".join(str(k.get("kid")) for k in usable)
        self.stdout.write(f"{'signing keys:':<25} {len(usable)} ({kids})")
        return []

    def _client_problems(self) -> list[str]:
        """Asks the token endpoint whether it accepts the client id and secret, and records
        the answer in the site-wide refresh pause."""
        try:
            oauth.verify_client_credentials()
        except InvalidClient as err:
            refused = err
            self._shared_state(lambda: throttle.client_rejected(refused))
            return [f"the token endpoint refused CLIENT_ID / CLIENT_SECRET ({err.error})"]
        except TokenError as err:
            return [f"the token endpoint refused a refresh: {err.error}"]
        except BrexOAuthError as err:
            return [f"the token endpoint could not be asked: {err}"]
        self.stdout.write(f"{'client credentials:':<25} accepted by the token endpoint")
        if self._shared_state(throttle.client_accepted):
            self.stdout.write(
                f"{'refreshing:':<25} was paused for the client credentials; resumes now"
            )
        return []

    def _pause_problems(self) -> list[str]:
        pause = self._shared_state(throttle.client_pause)
        if pause is None:
            return []
        since = f" since {pause.since:%Y-%m-%d %H:%M:%S} UTC" if pause.since else ""
        return [
            f"refreshing is paused for every connection{since}: {pause.detail}; "
            "connections stay active and resume once the credentials work"
        ]

    def _shared_state(self, read):
        """Read or write the client pause in the database; a site not migrated yet (or
        with its database down) still gets the rest of the report."""
        try:
            return read()
        except DatabaseError as err:
            self.stdout.write(self.style.WARNING(
                f"warning: could not read whether refreshing is paused ({type(err).__name__})"
            ))
            return None
