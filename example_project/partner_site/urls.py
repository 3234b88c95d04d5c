"""URLs of the example partner site: the app's views under /brex/, as the README says."""

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from . import views

admin.site.site_header = "Partner site administration"
admin.site.site_title = "Partner site admin"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("token-status/", views.token_status, name="token_status"),
    path("webhook-events/", views.webhook_events, name="webhook_events"),
    path(
        "login/",
        auth_views.LoginView.as_view(extra_context={"show_demo_login": settings.SHOW_DEMO_LOGIN}),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("brex/", include("django_brex_oauth.urls")),
]
