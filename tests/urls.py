from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpResponse
from django.template import engines
from django.urls import include, path

LOGIN_TEMPLATE = engines["django"].from_string(
    '<form method="post">{% csrf_token %}{{ form.as_p }}<button>Sign in</button></form>'
)


class LoginView(auth_views.LoginView):
    def get_template_names(self):
        return []

    def render_to_response(self, context, **kwargs):
        return HttpResponse(LOGIN_TEMPLATE.render(context, self.request))


urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", LoginView.as_view(), name="login"),
    path("brex/", include("django_brex_oauth.urls")),
    path("", lambda request: HttpResponse("home"), name="home"),
]
