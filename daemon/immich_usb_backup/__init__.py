"""immich-usb-backup: plug in an approved USB disk, get a backup of an Immich server."""

__version__ = "0.1.0"
