"""The web UI: ``immich-usb-backup web``, a process of its own that needs no root.

It serves the backup page, the history page and a JSON API (``app``), asks the daemon
through its control socket for the disks plugged in now, the live progress and every
action (``live``), reads the history from the state dir, and guards it all with a
password, sessions and CSRF tokens (``security``). docs/web.md is the user's guide.
"""
