from django.urls import path

from . import views, webhook_views

app_name = "brex_oauth"

urlpatterns = [
    path("connect/", views.connect, name="connect"),
    path("callback/", views.callback, name="callback"),
    path("connections/", views.connections, name="connections"),
    path("disconnect/<int:pk>/", views.disconnect, name="disconnect"),
    path("disconnect/<int:pk>/confirm/", views.disconnect_confirm, name="disconnect_confirm"),
    path("webhook/", webhook_views.receive, name="webhook"),
]
