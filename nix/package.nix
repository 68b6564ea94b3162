# The immich-usb-backup package: the command, the daemon and the udev rules.
#
#   nix-build -E 'with import <nixpkgs> { }; callPackage ./nix/package.nix { }'
#   nix build ./nix          (the flake; it builds from the files Git tracks)
{
  lib,
  python3Packages,
  rsync,
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

  dependencies = with python3Packages; [
    tomli-w
    pyudev
    dbus-fast
    apprise
  ];

  # The backup runs rsync (3.1 or newer) and blkid (util-linux); the daemon finds them on
  # PATH whatever the system has.
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [
      rsync
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
  ];

  # The test suite runs on the real stack: root, loop devices with real exFAT file
  # systems, and a system D-Bus, udevd and UDisks2 it starts itself (tests/stack.py).
  # None of that exists in the build sandbox, so no nativeCheckInputs and no tests here:
  # `sudo tools/test` in a checkout runs them.
  doCheck = false;

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
