"""``manage.py demo_user``: create (or reset) one of the demo's sign-ins."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from workspaces.models import Workspace


class Command(BaseCommand):
    help = (
        "Create a demo user or reset its password; staff and superuser unless --no-staff; "
        "a member of --workspace (created if missing) when given."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo", help="its username (demo)")
        parser.add_argument("--password", default="demo", help="its password (demo)")
        parser.add_argument("--workspace", default="", help="a workspace to make it a member of")
        parser.add_argument("--no-staff", action="store_true", help="an ordinary customer")

    def handle(
        self, *args, username: str, password: str, workspace: str, no_staff: bool, **options
    ) -> None:
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"email": f"{username}@example.com"}
        )
        user.is_staff = user.is_superuser = not no_staff
        user.is_active = True
        user.set_password(password)
        user.save()
        note = ""
        if workspace:
            team, _ = Workspace.objects.get_or_create(name=workspace)
            team.members.add(user)
            note = f", a member of {team.name!r}"
        self.stdout.write(
            f"{'Created' if created else 'Updated'} the demo user {username!r}{note}."
        )
