"""Check the BREX_OAUTH configuration against Brex's live discovery document."""

from __future__ import annotations

from django.core.checks import ERROR
from django.core.management.base import BaseCommand, CommandError

from django_brex_oauth import discovery
from django_brex_oauth.checks import check_settings
from django_brex_oauth.conf import brex_settings
from django_brex_oauth.exceptions import BrexOAuthError


class Command(BaseCommand):
    help = (
        "Validate BREX_OAUTH against the issuer's live OpenID configuration and JWKS: "
        "endpoints, PKCE S256, RS256 id_tokens and client_secret_post authentication."
    )

    def handle(self, *args, **options):
        problems: list[str] = []
        for message in check_settings():
            line = f"{message.id}: {message.msg}"
            if message.level >= ERROR:
                problems.append(line)
            else:
                self.stdout.write(self.style.WARNING(f"warning {line}"))
        if problems:
            raise CommandError("Configuration errors:\n  " + "\n  ".join(problems))

        self.stdout.write(f"environment:  {brex_settings.environment}")
        self.stdout.write(f"issuer:       {brex_settings.issuer}")
        self.stdout.write(f"API server:   {brex_settings.api_base_url}")
        self.stdout.write(f"scopes:       {' '.join(brex_settings.scopes)}")
        try:
            metadata = discovery.get_provider_metadata(force_refresh=True)
            jwks = discovery.get_jwks(force_refresh=True)
        except BrexOAuthError as err:
            raise CommandError(f"Discovery failed: {err}") from err

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
        usable = [k for k in jwks["keys"] if k.get("kty") == "RSA" and k.get("use", "sig") == "sig"]
        if not usable:
            problems.append("the JWKS holds no RSA signing key")
        else:
            kids = ", ".join(str(k.get("kid")) for k in usable)
            self.stdout.write(f"{'signing keys:':<25} {len(usable)} ({kids})")

        if problems:
            raise CommandError("Brex configuration problems:\n  " + "\n  ".join(problems))
        self.stdout.write(self.style.SUCCESS("Brex OAuth configuration OK."))
