# The immich-usb-backup package: the command, the daemon and the udev rules.
#
#   nix-build -E 'with import <nixpkgs> { }; callPackage ./nix/package.nix { }'
#   nix build ./nix          (the flake; it builds from the files Git tracks)
{
  lib,
  python3Packages,
  rsync,
  smartmontools,
  util-linux,
}:

let
  root = ../.;

  # The version is the one the wheel gets (hatch reads the same line):
  # `__version__ = "X.Y.Z"` in daemon/immich_usb_backup/__init__.py. Matched line by line,
  # so the regex never depends on whether `.` matches a newline.
  version =
    let
      lines = builtins.filter builtins.isString (
        builtins.split "\n" (builtins.readFile (root + "/daemon/immich_usb_backup/__init__.py"))
      );
      found = builtins.filter (m: m != null) (
        map (builtins.match ''__version__ = "([^"]+)"'') lines
      );
    in
    if found == [ ] then
      throw "immich-usb-backup: no __version__ line in daemon/immich_usb_backup/__init__.py"
    else
      builtins.head (builtins.head found);

  # Leave out what only a developer's checkout has: the virtual environment, caches, test
  # output, and this folder (so editing the module does not rebuild the package).
  skipped = [
    ".venv"
    ".mypy_cache"
    ".pytest_cache"
    ".ruff_cache"
    "test-artifacts"
    "nix"
  ];

  # notify.py speaks the Apprise 2 API (pyproject.toml: apprise>=2.0; with 1.x every
  # notification fails). A nixpkgs whose apprise is still 1.x (1.13.1 was the newest in
  # nixpkgs when this was written) gets Apprise 2.3.0 from PyPI, for this package only;
  # a nixpkgs with apprise 2 or newer is used as it is. Apprise's own test suite is
  # nixpkgs' business, and an older nixpkgs' list of its test inputs may not fit 2.3.0.
  apprise =
    if lib.versionAtLeast python3Packages.apprise.version "2" then
      python3Packages.apprise
    else
      python3Packages.apprise.overridePythonAttrs (old: {
        version = "2.3.0";
        src = python3Packages.fetchPypi {
          pname = "apprise";
          version = "2.3.0";
          hash = "sha256-NZs3Mgy3zRaaV6R1NGv+rM21B0swfGq6o697YnkLG1I=";
        };
        # 2.x declares these two itself (requests brought them along before)
        dependencies = old.dependencies or [ ] ++ [
          python3Packages.certifi
          python3Packages.urllib3
        ];
        doCheck = false;
      });
in
python3Packages.buildPythonApplication {
  pname = "immich-usb-backup";
  inherit version;
  pyproject = true;

  src = lib.cleanSourceWith {
    name = "immich-usb-backup-source";
    src = lib.cleanSource root;
    filter =
      path: _type:
      !(builtins.elem (lib.removePrefix (toString root + "/") (toString path)) skipped);
  };

  build-system = [ python3Packages.hatchling ];

  dependencies = [
    python3Packages.tomli-w
    python3Packages.pyudev
    python3Packages.dbus-fast
    apprise
    python3Packages.aiohttp # the web UI
    python3Packages.jinja2 # the history page and the web UI's pages
  ];

  # The backup runs rsync (3.1 or newer), blkid (util-linux) and smartctl (a disk's
  # health); the daemon finds them on PATH whatever the system has.
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [
      rsync
      smartmontools
      util-linux
    ])
  ];

  # The rules tell udev (and UDisks2) about USB exFAT backup disks. On NixOS,
  # services.udev.packages = [ this package ] picks them up (the module does it).
  postInstall = ''
    install -Dm644 udev/90-immich-usb-backup.rules -t $out/lib/udev/rules.d/
  '';

  pythonImportsCheck = [
    "immich_usb_backup"
    "immich_usb_backup.cli"
    "immich_usb_backup.daemon" # pyudev and dbus-fast
    "immich_usb_backup.notify" # apprise
    "immich_usb_backup.web.app" # aiohttp, jinja2
  ];

  # The tests that need no root run here: config, policy, scan, history, status, notify
  # (a local SMTP and webhook server), the report, the restore guide's text, the unit
  # file's hardening, the packaging. The rest need the real stack (root, loop devices
  # with exFAT file systems, a system D-Bus, udevd and UDisks2, PostgreSQL, Chromium),
  # which the build sandbox does not have: `sudo tools/test` in a checkout runs them.
  # Such a test would skip itself here (tests/conftest.py need() skips when a piece is
  # missing, and fails only under CI=true, which the sandbox does not set); they are left
  # out below all the same, so that a builder that happens to offer some piece (one
  # running as root, say) does not half-run them. tests/test_nix.py checks that every
  # test that calls need() is left out here.
  nativeCheckInputs = [
    python3Packages.pytestCheckHook
    python3Packages.pytest-timeout # pyproject.toml sets a per-test timeout
    python3Packages.aiosmtpd # the SMTP server the notification tests send mail to
    # the tests run the program as `python -m immich_usb_backup`, not through the wrapper
    # below: the same tools on PATH as it has when installed
    rsync
    smartmontools
    util-linux
  ];

  # root, a loop device and a real exFAT file system each. (disabledTestMarks needs
  # nixpkgs 25.05 or newer; an older one runs these, and they skip themselves as above.)
  disabledTestMarks = [ "exfat" ];

  disabledTestPaths = [
    # the daemon end to end: udevd, UDisks2 and loop devices (tests/stack.py)
    "tests/test_daemon_e2e.py"
    # parses nix/ with nix-instantiate; nix/ is not in the source above
    "tests/test_nix.py"
    # the daemon's control socket and the web UI in Debian's Chromium, on the real stack
    "tests/test_daemon_control.py"
    "tests/test_web_browser.py"
    # the web unit (systemd-analyze) and the module's web options: nix/ is not in the
    # source above
    "tests/test_web_install.py"
    # Immich-shaped databases in a throwaway PostgreSQL run as nobody: root
    "tests/test_assets.py"
  ];

  disabledTests = [
    # the udev rule on a real udevd with loop devices
    "test_the_udev_rule_marks"
    # systemd-analyze and the program installed in /usr/local/bin
    "test_the_unit_passes_systemd_analyze_verify"
    # a headless Chromium
    "test_chromium_renders_the_page"
    # the control socket's owner and mode, and clients run as other users: root
    "test_the_socket_is_root_and_the_group"
    "test_a_client_outside_the_group"
    "test_without_the_group_only_root"
  ];

  meta = {
    description = "Back up a self-hosted Immich server onto an approved exFAT USB disk when it is plugged in";
    longDescription = ''
      A daemon that notices an approved, marked exFAT USB disk being plugged in (udev),
      mounts it (UDisks2), copies Immich's newest database dump, the server's
      configuration files and a mirror of every photo and video onto it, then unmounts
      it and powers it off, and says so by e-mail, push or chat message (Apprise).
    '';
    license = lib.licenses.agpl3Plus;
    mainProgram = "immich-usb-backup";
    platforms = lib.platforms.linux;
  };
}
