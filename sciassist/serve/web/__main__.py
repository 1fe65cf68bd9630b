"""python -m sciassist.serve.web: serve the chat page and API for one checkpoint.

Binds 127.0.0.1 by default: there is no authentication, so exposing it (--host 0.0.0.0)
is a deliberate choice, and it prints a warning when made.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass

from nanochat.checkpoint import CheckpointError
from sciassist.checkpoints import CheckpointSettings, resolve_from_settings
from sciassist.common import (
    UserError,
    missing_extra_message,
    print_error,
    setting,
    settings_from_namespace,
    settings_parser,
)

try:  # the web extra; without it `python -m sciassist.serve.web` says so in one line, as `sciassist web` does
    import uvicorn

    from sciassist.serve.web.server import ServerSettings, create_app
except ModuleNotFoundError as missing:
    message = missing_extra_message("python -m sciassist.serve.web", missing)
    if __name__ != "__main__" or message is None:
        raise  # imported: sciassist.cli (or the importer) reports it
    sys.exit(print_error(message))


@dataclass
class WebCommand(CheckpointSettings, ServerSettings):
    """The model flags, the server's settings, and where to listen."""

    host: str = setting("127.0.0.1", "address to bind (default 127.0.0.1: this machine only)")
    port: int = setting(8000, "port to listen on", at_least=1, at_most=65535)


def build_parser():
    return settings_parser(WebCommand, "python -m sciassist.serve.web", "Chat with a checkpoint in the browser.",
                           renamed={"--system": "--system_prompt"})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = build_parser()
    command = settings_from_namespace(WebCommand, parser.parse_args(argv))  # every value checked as parsed
    try:
        loaded = resolve_from_settings(command)
    except (CheckpointError, UserError) as err:
        return print_error(err)
    settings = ServerSettings(**{name: getattr(command, name) for name in ServerSettings.__dataclass_fields__})
    settings.system_prompt = settings.system_prompt or None
    if command.host not in ("0.0.0.0", "::"):
        settings.allowed_hosts = [*settings.allowed_hosts, command.host]  # the address it is bound to
    app = create_app(loaded, settings)
    if not _is_loopback(command.host):
        print(f"warning: serving on {command.host}: anyone who can reach it can use the model (no authentication)",
              file=sys.stderr)
        if not settings.allowed_hosts or command.host in ("0.0.0.0", "::"):
            print("note: requests are answered only when addressed to a loopback name or an --allow_host NAME; add "
                  "the names clients use (this machine's name or address)", file=sys.stderr)
    print(f"SciAssist chat: {loaded.choice.describe()} -> http://{command.host}:{command.port}/", file=sys.stderr)
    # A bounded graceful shutdown: Ctrl-C should not wait for a long answer to finish.
    uvicorn.run(app, host=command.host, port=command.port, log_level="info", timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
