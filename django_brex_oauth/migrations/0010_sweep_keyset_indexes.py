"""The sweep's two partial indexes gain the connection id as their second column.

The sweep reads each arm of the due rule in batches ordered by (expiry or last use,
connection id) and starts each batch after the last row of the one before with a row
comparison on both columns. With the connection id in the index that comparison is one
index range, however many tokens share an instant; on the first column alone, every batch
read again the rows of the instant it started in. Same names, same condition
(``SWEPT_TOKENS``).
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("brex_oauth", "0009_translatable_names"),
    ]

    operations = [
        migrations.RemoveIndex(model_name="brextoken", name="brex_oauth_token_due"),
        migrations.RemoveIndex(model_name="brextoken", name="brex_oauth_token_idle"),
        migrations.AddIndex(
            model_name="brextoken",
            index=models.Index(
                condition=models.Q(("access_token_expires_at__isnull", False)),
                fields=["access_token_expires_at", "connection_id"],
                name="brex_oauth_token_due",
            ),
        ),
        migrations.AddIndex(
            model_name="brextoken",
            index=models.Index(
                condition=models.Q(("access_token_expires_at__isnull", False)),
                fields=["refresh_token_used_at", "connection_id"],
                name="brex_oauth_token_idle",
            ),
        ),
    ]
