"""The chat web UI and API: python -m sciassist.serve.web (make chat-web)."""

from sciassist.serve.web.server import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
