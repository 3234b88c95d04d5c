"""Verbose names for the models and fields shown to people, so that they can be translated.

Only names change (no SQL). ``BrexConnection.owner`` and ``team`` depend on
``settings.BREX_OAUTH_TEAM_MODEL``, as in migration 0007.
"""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

import django_brex_oauth.models

TEAM_MODEL = getattr(settings, "BREX_OAUTH_TEAM_MODEL", None) or None

if TEAM_MODEL:
    owner_operations = [
        migrations.AlterField(
            model_name="brexconnection",
            name="owner",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django_brex_oauth.models.owner_deleted,
                related_name="brex_connections", to=settings.AUTH_USER_MODEL,
                verbose_name="owner",
            ),
        ),
        migrations.AlterField(
            model_name="brexconnection",
            name="team",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django.db.models.deletion.CASCADE,
                related_name="brex_connections", to=TEAM_MODEL, verbose_name="team",
            ),
        ),
    ]
else:
    owner_operations = [
        migrations.AlterField(
            model_name="brexconnection",
            name="owner",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE, related_name="brex_connections",
                to=settings.AUTH_USER_MODEL, verbose_name="owner",
            ),
        ),
    ]


class Migration(migrations.Migration):

    dependencies = [
        ('brex_oauth', '0008_rate_limits_and_client_pause'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        *([migrations.swappable_dependency(TEAM_MODEL)] if TEAM_MODEL else []),
    ]

    operations = [
        migrations.AlterModelOptions(
            name='authorizationrequest',
            options={'verbose_name': 'pending Brex authorization', 'verbose_name_plural': 'pending Brex authorizations'},
        ),
        migrations.AlterModelOptions(
            name='brexconnection',
            options={'ordering': ['-connected_at'], 'permissions': [('revoke_brexconnection', 'Can revoke Brex connections at Brex')], 'verbose_name': 'Brex connection', 'verbose_name_plural': 'Brex connections'},
        ),
        migrations.AlterModelOptions(
            name='brexthrottle',
            options={'verbose_name': 'Brex rate limit', 'verbose_name_plural': 'Brex rate limits'},
        ),
        migrations.AlterModelOptions(
            name='brextoken',
            options={'verbose_name': 'Brex token', 'verbose_name_plural': 'Brex tokens'},
        ),
        migrations.AlterModelOptions(
            name='brexwebhookevent',
            options={'ordering': ['-received_at', '-pk'], 'verbose_name': 'Brex webhook event', 'verbose_name_plural': 'Brex webhook events'},
        ),
        migrations.AlterModelOptions(
            name='brexwebhooksubscription',
            options={'ordering': ['-created_at', '-pk'], 'verbose_name': 'Brex webhook subscription', 'verbose_name_plural': 'Brex webhook subscriptions'},
        ),
        migrations.AlterModelOptions(
            name='connectionevent',
            options={'ordering': ['-created_at', '-pk'], 'verbose_name': 'Brex connection event', 'verbose_name_plural': 'Brex connection events'},
        ),
        migrations.AlterModelOptions(
            name='detachedrevocation',
            options={'verbose_name': 'revocation of a deleted Brex connection', 'verbose_name_plural': 'revocations of deleted Brex connections'},
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='consumed_at',
            field=models.DateTimeField(blank=True, null=True, verbose_name='consumed at'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='created_at',
            field=models.DateTimeField(default=django.utils.timezone.now, verbose_name='created at'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='environment',
            field=models.CharField(choices=[('production', 'Production'), ('staging', 'Staging')], max_length=16, verbose_name='environment'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='expires_at',
            field=models.DateTimeField(db_index=True, verbose_name='expires at'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='next_url',
            field=models.CharField(blank=True, max_length=2000, verbose_name='next URL'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='prompt_login',
            field=models.BooleanField(default=False, verbose_name='prompt login'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='redirect_uri',
            field=models.URLField(max_length=1000, verbose_name='redirect URI'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='requested_scopes',
            field=models.TextField(verbose_name='requested scopes'),
        ),
        migrations.AlterField(
            model_name='authorizationrequest',
            name='user',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+', to=settings.AUTH_USER_MODEL, verbose_name='user'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='connected_at',
            field=models.DateTimeField(default=django.utils.timezone.now, verbose_name='connected at'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='environment',
            field=models.CharField(choices=[('production', 'Production'), ('staging', 'Staging')], max_length=16, verbose_name='environment'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='granted_scopes',
            field=models.TextField(blank=True, help_text='Space-separated scopes the customer granted.', verbose_name='granted scopes'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='last_error',
            field=models.TextField(blank=True, verbose_name='last error'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='last_refreshed_at',
            field=models.DateTimeField(blank=True, null=True, verbose_name='last refreshed at'),
        ),
        *owner_operations,
        migrations.AlterField(
            model_name='brexconnection',
            name='revocation_attempted_at',
            field=models.DateTimeField(blank=True, help_text='When Brex was last asked to revoke this connection.', null=True, verbose_name='revocation attempted at'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='revocation_attempts',
            field=models.PositiveIntegerField(default=0, help_text='Requests sent to Brex to revoke this connection so far.', verbose_name='revocation attempts'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='revocation_status',
            field=models.CharField(blank=True, choices=[('', 'Not requested'), ('pending', 'Pending at Brex'), ('done', 'Revoked at Brex'), ('not_possible', 'Brex could not be told')], default='', max_length=16, verbose_name='revocation status'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='revoked_at',
            field=models.DateTimeField(blank=True, null=True, verbose_name='revoked at'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='status',
            field=models.CharField(choices=[('active', 'Active'), ('needs_reauth', 'Needs re-authorization'), ('revoked', 'Revoked')], default='active', max_length=16, verbose_name='status'),
        ),
        migrations.AlterField(
            model_name='brexconnection',
            name='updated_at',
            field=models.DateTimeField(auto_now=True, verbose_name='updated at'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='attempts',
            field=models.PositiveIntegerField(default=0, help_text='Times the handlers were run for this event.', verbose_name='attempts'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='connections',
            field=models.ManyToManyField(blank=True, help_text="The active connections of the event's Brex company when it was processed.", related_name='webhook_events', to='brex_oauth.brexconnection', verbose_name='connections'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='event_type',
            field=models.CharField(db_index=True, max_length=64, verbose_name='event type'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='last_error',
            field=models.TextField(blank=True, verbose_name='last error'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='payload',
            field=models.JSONField(verbose_name='payload'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='processed_at',
            field=models.DateTimeField(blank=True, null=True, verbose_name='processed at'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='processing_since',
            field=models.DateTimeField(blank=True, help_text='When the handlers now running were started.', null=True, verbose_name='processing since'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='received_at',
            field=models.DateTimeField(db_index=True, default=django.utils.timezone.now, verbose_name='received at'),
        ),
        migrations.AlterField(
            model_name='brexwebhookevent',
            name='status',
            field=models.CharField(choices=[('received', 'Received, not processed yet'), ('processing', 'Processing'), ('processed', 'Processed'), ('ignored', 'Ignored: no active connection for its company'), ('failed', 'A handler failed')], default='received', max_length=16, verbose_name='status'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='attempts',
            field=models.PositiveIntegerField(default=0, verbose_name='attempts'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='connection',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='webhook_subscriptions', to='brex_oauth.brexconnection', verbose_name='connection'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='created_at',
            field=models.DateTimeField(default=django.utils.timezone.now, verbose_name='created at'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='event_types',
            field=models.JSONField(default=list, verbose_name='event types'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='last_error',
            field=models.TextField(blank=True, verbose_name='last error'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='status',
            field=models.CharField(choices=[('subscribing', 'Being created at Brex'), ('active', 'Active at Brex'), ('unsubscribing', 'Being deleted at Brex'), ('deleted', 'Deleted at Brex'), ('abandoned', 'Could not be deleted: no live grant left')], default='subscribing', max_length=16, verbose_name='status'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='updated_at',
            field=models.DateTimeField(auto_now=True, verbose_name='updated at'),
        ),
        migrations.AlterField(
            model_name='brexwebhooksubscription',
            name='url',
            field=models.URLField(max_length=1000, verbose_name='URL'),
        ),
        migrations.AlterField(
            model_name='connectionevent',
            name='actor',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL, verbose_name='actor'),
        ),
        migrations.AlterField(
            model_name='connectionevent',
            name='connection',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='events', to='brex_oauth.brexconnection', verbose_name='connection'),
        ),
        migrations.AlterField(
            model_name='connectionevent',
            name='created_at',
            field=models.DateTimeField(db_index=True, default=django.utils.timezone.now, verbose_name='created at'),
        ),
        migrations.AlterField(
            model_name='connectionevent',
            name='detail',
            field=models.TextField(blank=True, verbose_name='detail'),
        ),
        migrations.AlterField(
            model_name='connectionevent',
            name='kind',
            field=models.CharField(choices=[('connected', 'Connected'), ('reconnected', 'Reconnected'), ('refreshed', 'Tokens refreshed'), ('refresh_failed', 'Refresh failed'), ('refresh_discarded', 'Refreshed tokens discarded'), ('scopes_changed', 'Granted scopes changed'), ('needs_reauth', 'Needs re-authorization'), ('disconnected', 'Disconnected'), ('revoked', 'Revoked at Brex'), ('revoke_failed', 'Revocation at Brex failed'), ('webhook_subscribed', 'Subscribed to Brex webhooks'), ('webhook_subscribe_failed', 'Webhook subscription failed'), ('webhook_unsubscribed', 'Unsubscribed from Brex webhooks'), ('webhook_unsubscribe_failed', 'Webhook unsubscription failed')], max_length=32, verbose_name='kind'),
        ),
    ]
