"""Allow ``python -m immich_usb_backup``."""

from immich_usb_backup.cli import main

raise SystemExit(main())
