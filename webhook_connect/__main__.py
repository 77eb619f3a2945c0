"""``python -m webhook_connect``: the same command as ``webhook-connect``."""

from webhook_connect.cli import main

main()
