"""The command line: ``python -m django_brex_oauth.testing.fake_brex [options]``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .base import DEFAULT_CLIENT_NAME
from .fake import FakeBrex


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m django_brex_oauth.testing.fake_brex",
        description="Serve a fake Brex OAuth server and API for local development.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="port to listen on (default: 8765; 0 picks one)"
    )
    parser.add_argument("--public-url", help="base URL clients use, if not http://host:port")
    parser.add_argument(
        "--client-id",
        default="test-client-id",
        help="the registered client's id (default: test-client-id)",
    )
    parser.add_argument(
        "--client-secret",
        default="test-client-secret",
        help="the registered client's secret (default: test-client-secret)",
    )
    parser.add_argument(
        "--client-name",
        default=DEFAULT_CLIENT_NAME,
        help=f"the app name the consent page shows (default: {DEFAULT_CLIENT_NAME})",
    )
    parser.add_argument(
        "--redirect-uri",
        action="append",
        dest="redirect_uris",
        help="allowed redirect URI (repeatable); default: any",
    )
    parser.add_argument(
        "--access-token-ttl",
        type=float,
        default=3600,
        help="seconds an access token lasts (default: 3600)",
    )
    parser.add_argument(
        "--refresh-token-lifetime",
        type=float,
        default=90 * 24 * 3600,
        help="seconds a refresh token chain lasts (default: 90 days)",
    )
    parser.add_argument(
        "--refresh-grace-period",
        type=float,
        default=30.0,
        help="seconds a rotated-out refresh token still works (default: 30)",
    )
    parser.add_argument(
        "--authorization-code-ttl",
        type=float,
        default=60,
        help="seconds an authorization code stays valid (default: 60)",
    )
    parser.add_argument("--no-rotate", action="store_true", help="keep refresh tokens on refresh")
    parser.add_argument(
        "--no-expires-in", action="store_true", help="omit expires_in from token responses"
    )
    parser.add_argument(
        "--no-scope",
        action="store_true",
        help="omit scope from token responses, like Brex's documented example response",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a :class:`FakeBrex` until Ctrl-C or SIGTERM."""
    args = _parser().parse_args(argv)
    fake = FakeBrex(
        host=args.host,
        port=args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
        client_name=args.client_name,
        redirect_uris=args.redirect_uris,
        access_token_ttl=args.access_token_ttl,
        refresh_token_lifetime=args.refresh_token_lifetime,
        rotate_refresh_tokens=not args.no_rotate,
        refresh_grace_period=args.refresh_grace_period,
        include_expires_in=not args.no_expires_in,
        include_scope=not args.no_scope,
        authorization_code_ttl=args.authorization_code_ttl,
        public_url=args.public_url,
    )
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, request_stop)
        except ValueError:
            pass
    try:
        try:
            fake.start()
        except OSError as error:
            print(f"cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
            return 2
        print(f"issuer: {fake.issuer}", flush=True)
        print(f"api_base_url: {fake.api_base_url}", flush=True)
        print("BREX_OAUTH = " + json.dumps(fake.django_settings(), indent=4), flush=True)
        print("Serving until Ctrl-C.", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
