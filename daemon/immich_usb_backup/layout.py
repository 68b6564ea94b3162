"""Every name this program writes on the backup disk, in one place.

```
<disk>/immich-server-backups/   MARKER: made by the user or `approve`, never by a run
  disk-key.txt                  KEY: the disk's key (see docs/first-disk.md)
  README.txt                    README
  backup-info.toml              INFO
  history.html                  PAGE
  library/                      LIBRARY: the mirror of the upload location
  library.sha256                MANIFEST
  database/                     DATABASE: Immich's dumps, the newest N
  config/                       CONFIG: config-YYYY-MM-DDTHHMMSS.zip, the newest N
  deleted/YYYY-MM-DD/           DELETED: the keep area
  .incoming/                    INCOMING: rsync's temporary files while it copies
```

Other modules take these names from here; docs/usage.md ("What lands on the disk")
describes them for users.
"""

from __future__ import annotations

MARKER = "immich-server-backups"
LEGACY_MARKER = "immich-server-backup"  # the old web UI's folder: recognised, not used
KEY = "disk-key.txt"
README = "README.txt"
INFO = "backup-info.toml"
PAGE = "history.html"
LIBRARY = "library"
MANIFEST = "library.sha256"
DATABASE = "database"
CONFIG = "config"
DELETED = "deleted"
INCOMING = ".incoming"
