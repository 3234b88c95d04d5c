"""Workspaces: the teams of the example site. A workspace's members share its Brex
connections (``BREX_OAUTH_TEAM_MODEL = "workspaces.Workspace"``)."""
