"""The chat web page and API: python -m sciassist.serve.web (make chat-web)."""
