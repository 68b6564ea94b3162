# NixOS module: services.immich-usb-backup.
#
# Runs the daemon (as root, like the plain systemd unit in systemd/), which backs Immich up
# onto an approved exFAT USB disk whenever one is plugged in; optionally also on a
# schedule, onto every approved disk that is connected then. docs/install.md has the
# walk-through; docs/configuration.md explains every settings key.
#
#   imports = [ ./immich-usb-backup/nix/module.nix ];   # or the flake's nixosModules.default
#   services.immich-usb-backup = {
#     enable = true;
#     # Immich's UPLOAD_LOCATION. Leave it out when Immich runs from its own NixOS module
#     # here (services.immich.enable): then it is services.immich.mediaLocation.
#     settings.immich.upload_location = "/srv/immich/library";
#     approvedDisks = [ "6F5F-FDC3" ];
#     notificationUrlsFile = "/run/secrets/immich-usb-backup-notify";
#   };
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.immich-usb-backup;
  inherit (lib) mkOption types;

  settingsFormat = pkgs.formats.toml { };

  defaultStateDir = "/var/lib/immich-usb-backup";
  stateDir = cfg.settings.state.dir;
  # systemd's StateDirectory= makes this one (and everything under it) writable.
  stateDirIsDefault = stateDir == defaultStateDir || lib.hasPrefix "${defaultStateDir}/" stateDir;

  # Immich's own NixOS module, when this machine runs it: its media location is Immich's
  # upload location. `or` keeps this module working with a nixpkgs without services.immich.
  immichEnabled = config.services.immich.enable or false;

  # A file that may hold secrets: given as a string, so that it is never copied into the
  # world-readable Nix store (a path literal such as ./notify-urls would be), and not a
  # store path itself.
  secretPath =
    types.addCheck types.str (
      p: lib.hasPrefix "/" p && !lib.hasPrefix "${builtins.storeDir}/" p
    )
    // {
      description = "absolute path outside the Nix store, as a string";
    };

  # TOML has no null: keys left at null are left out, and the program's default applies.
  configFile = settingsFormat.generate "immich-usb-backup.toml" (
    lib.filterAttrsRecursive (_: v: v != null) cfg.settings
  );

  exe = "${cfg.package}/bin/immich-usb-backup";

  # web.listen is HOST:PORT ([v6]:PORT): the port for the firewall, the host to warn about
  webPort = lib.toInt (lib.last (lib.splitString ":" cfg.web.listen));
  webHost = lib.removeSuffix ":${toString webPort}" cfg.web.listen;
  webIsLoopback = lib.elem webHost [
    "127.0.0.1"
    "localhost"
    "[::1]"
  ];

  # What both services lock away: namespaces, realtime, set-uid, personality, the
  # kernel's tunables, modules and log, control groups, the host name, other ABIs.
  lockedDown = {
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
    SystemCallArchitectures = "native";
  };

  # The same sandbox as the plain unit systemd/immich-usb-backup.service (its comments
  # say why each line is there, and why PrivateDevices=, ProtectClock= (it shuts blkid
  # out on some systemd versions), CapabilityBoundingSet= and SystemCallFilter= are not).
  # The program runs as root: it reads the upload location whoever owns it
  # (ProtectHome=read-only still lets it read /home), and writes only to its state dir
  # and to the disks UDisks2 mounts under /run/media (or /media). No UMask= either, as
  # there: the history and status files stay readable for `immich-usb-backup history`
  # and `status` run by other users.
  serviceHardening = lockedDown // {
    # SIGTERM to the main process only: it ends rsync, records the run "interrupted" and
    # unmounts what it mounted; whatever is left after TimeoutStopSec is killed.
    KillMode = "mixed";
    TimeoutStopSec = 120;
    StateDirectory = "immich-usb-backup";
    ProtectSystem = "strict";
    ReadWritePaths = [
      "-/run/media"
      "-/media"
    ]
    ++ lib.optional (!stateDirIsDefault) stateDir;
    ProtectHome = "read-only";
    PrivateTmp = true;
    NoNewPrivileges = true;
    # AF_UNIX: D-Bus, sd_notify; AF_NETLINK: udev events; AF_INET/AF_INET6: notifications.
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_NETLINK"
      "AF_INET"
      "AF_INET6"
    ];
  };

  # UDisks2 mounts the disks; the "started" message needs the network.
  unitDependencies = {
    wants = [
      "udisks2.service"
      "network-online.target"
    ];
    after = [
      "udisks2.service"
      "network-online.target"
    ];
  };
in
{
  options.services.immich-usb-backup = {
    enable = lib.mkEnableOption "immich-usb-backup, which backs up Immich onto an approved exFAT USB disk whenever it is plugged in";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The immich-usb-backup package to use.";
    };

    settings = mkOption {
      default = { };
      description = ''
        The configuration, written to a TOML file and passed to the daemon with `-c`
        (and linked as /etc/immich-usb-backup/config.toml, which the command line reads
        by default). Every key of docs/configuration.md can be set here, as
        `section.key`; the ones below are typed. The file lives in the world-readable
        Nix store: never put a password here (no `notify.urls` with one), use
        {option}`services.immich-usb-backup.notificationUrlsFile` instead.
      '';
      example = lib.literalExpression ''
        {
          immich.upload_location = "/srv/immich/library";
          config_backup.paths = [ "/etc/nixos" "/srv/immich/immich-config.json" ];
          library.excludes = [ "/thumbs" "/encoded-video" ];
          notify.events = [ "finished" "refused" "needs_approval" ];
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;

        options = {
          immich.upload_location = mkOption {
            type = types.nullOr types.str;
            default =
              if immichEnabled then toString config.services.immich.mediaLocation else null;
            defaultText = lib.literalExpression ''
              if config.services.immich.enable then config.services.immich.mediaLocation else null
            '';
            example = "/srv/immich/library";
            description = ''
              Immich's upload location (`UPLOAD_LOCATION`, the folder Immich mounts at
              /data), mirrored onto the disk. Defaults to
              {option}`services.immich.mediaLocation` when Immich runs from its NixOS
              module on this machine; must be set otherwise.
            '';
          };

          database.enabled = mkOption {
            type = types.bool;
            default = true;
            description = "Copy the newest of Immich's nightly database dumps onto the disk.";
          };

          config_backup.paths = mkOption {
            type = types.listOf types.str;
            default = [ "/etc/nixos" ];
            example = [
              "/etc/nixos"
              "/srv/immich/immich-config.json"
            ];
            description = ''
              Files, and folders recursively, zipped into config/ on the disk at each
              backup. A path that does not exist is reported as a problem (the run is
              `partial`): point it at wherever this machine's configuration lives.
            '';
          };

          library.mode = mkOption {
            type = types.enum [
              "quick"
              "verify"
              "full"
            ];
            default = "quick";
            description = ''
              How the copy is checked: `quick` (size and modification time), `verify`
              (also compare the contents of the files copied and of a rolling share of
              the rest), `full` (compare the contents of every file).
            '';
          };

          library.keep_deleted_days = mkOption {
            type = types.ints.unsigned;
            default = 30;
            description = ''
              Files deleted or changed on the server are moved into
              `immich-server-backups/deleted/YYYY-MM-DD/` on the disk and kept this many
              days; 0 deletes them at once.
            '';
          };

          library.excludes = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [
              "/thumbs"
              "/encoded-video"
            ];
            description = ''
              Paths to leave out, relative to the upload location (see
              docs/configuration.md for the pattern rules).
            '';
          };

          disks.approved = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = ''
              File system UUIDs of approved disks; prefer
              {option}`services.immich-usb-backup.approvedDisks`, which ends up here.
            '';
          };

          disks.allow_any_marked = mkOption {
            type = types.bool;
            default = false;
            description = ''
              Back up to any USB exFAT disk that carries the `immich-server-backups`
              folder, approved or not.
            '';
          };

          disks.power_off = mkOption {
            type = types.bool;
            default = true;
            description = ''
              After a backup that mounted the disk, unmount it and power it off, so it is
              safe to unplug.
            '';
          };

          notify.urls_file = mkOption {
            type = types.nullOr secretPath;
            default = null;
            description = ''
              A file of Apprise URLs, one a line; prefer
              {option}`services.immich-usb-backup.notificationUrlsFile`, which ends up here.
            '';
          };

          notify.remind_after_days = mkOption {
            type = types.ints.unsigned;
            default = 7;
            description = ''
              Send a "no backup for N days" reminder (at most one a day) when the newest
              backup onto any approved disk is older than this; 0: never.
            '';
          };

          notify.heartbeat_urls = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "https://hc-ping.com/your-check-uuid" ];
            description = ''
              URLs fetched after each successful backup, for an outside monitor
              (healthchecks.io, Uptime Kuma push). They end up in the world-readable Nix
              store, like every setting: a push token there can at most send a false
              "backup done".
            '';
          };

          database.source = mkOption {
            type = types.enum [
              "nightly"
              "immich-api"
              "command"
            ];
            default = "nightly";
            description = ''
              Where the database dump comes from: Immich's nightly dumps, a fresh one from
              Immich's API (`immich.url`, `immich.api_key_file`), or `database.command`.
            '';
          };

          state.dir = mkOption {
            type = types.str;
            default = defaultStateDir;
            description = ''
              Where the history, the live status, the lock and the disks approved with
              `immich-usb-backup approve` are kept.
            '';
          };
        };
      };
    };

    approvedDisks = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "6F5F-FDC3" ];
      description = ''
        File system UUIDs (`XXXX-XXXX`, as `immich-usb-backup disks` shows them) of the
        disks the daemon backs up to when they are plugged in. Added to
        `settings.disks.approved`. Disks approved with `immich-usb-backup approve` (kept
        in the state dir) count too.
      '';
    };

    notificationUrlsFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/immich-usb-backup-notify";
      description = ''
        A file with Apprise URLs (mail, ntfy, Telegram, ...), one a line, for the
        messages when a backup starts, ends, is refused or a disk needs approval
        (docs/notifications.md). Becomes `settings.notify.urls_file`. The URLs often
        hold passwords or tokens, so the file stays out of the Nix store: give its path
        as a string, and make it readable by root only (`chmod 600`, owner root), for
        example a secret from agenix or sops-nix. It is read at every notification.
      '';
    };

    schedule = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "*-*-* 03:00:00";
      description = ''
        When set (a systemd OnCalendar= expression, see systemd.time(7)), a timer also
        runs `immich-usb-backup run approved --trigger schedule` at these times: a backup
        onto every approved disk that is connected then, for a disk left plugged in. A
        time missed while the machine was off is caught up at the next boot. `null`:
        backups happen only when a disk is plugged in (or by hand).
      '';
    };

    web.enable = lib.mkEnableOption ''
      the web UI (`immich-usb-backup web`, docs/web.md): a page, for a phone too, with
      the disks plugged in now, Back up now, the live progress and the history. It runs
      as a service of its own without root (DynamicUser=, in the group
      `immich-usb-backup` that may use the daemon's control socket). Set its password
      once with `sudo immich-usb-backup web-password`'';

    web.listen = mkOption {
      type = types.strMatching "([[][0-9A-Fa-f:.]+[]]|[^:[:space:]]+):[0-9]{1,5}";
      default = "127.0.0.1:8429";
      example = "[::1]:8429";
      description = ''
        Where the web UI listens, `HOST:PORT`. Keep it on the loopback address and put a
        reverse proxy with TLS in front for the LAN (docs/web.md has Caddy and nginx
        examples); the session cookie is `Secure` behind such a proxy.
      '';
    };

    web.passwordFile = mkOption {
      type = secretPath;
      default = "${defaultStateDir}/web-password";
      description = ''
        The web UI's password as a scrypt hash, written by
        `sudo immich-usb-backup web-password` (never the password itself). The web UI
        refuses to start without it.
      '';
    };

    web.openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the port of {option}`services.immich-usb-backup.web.listen` in the firewall.
        Only useful with a listen address other than the loopback one, which sends the
        password over the LAN unencrypted: prefer a reverse proxy with TLS.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.settings.immich.upload_location != null;
        message = ''
          services.immich-usb-backup.settings.immich.upload_location must be set to
          Immich's upload location (UPLOAD_LOCATION). It defaults to
          services.immich.mediaLocation only when services.immich is enabled here.
        '';
      }
      {
        assertion =
          cfg.settings.immich.upload_location == null
          || lib.hasPrefix "/" cfg.settings.immich.upload_location;
        message = "services.immich-usb-backup.settings.immich.upload_location must be an absolute path.";
      }
      {
        assertion = lib.hasPrefix "/" stateDir;
        message = "services.immich-usb-backup.settings.state.dir must be an absolute path.";
      }
      {
        assertion = lib.all (uuid: builtins.match "[^[:space:]]+" uuid != null) cfg.settings.disks.approved;
        message = "services.immich-usb-backup.approvedDisks: each entry must be a file system UUID (no spaces, not empty).";
      }
    ];

    warnings =
      lib.optional ((cfg.settings.notify.urls or [ ]) != [ ]) ''
        services.immich-usb-backup.settings.notify.urls ends up in the world-readable Nix
        store. If a URL holds a password or token, move it to a root-only file and set
        services.immich-usb-backup.notificationUrlsFile instead.
      ''
      ++ lib.optional (cfg.web.enable && cfg.web.openFirewall && webIsLoopback) ''
        services.immich-usb-backup.web.openFirewall opens a port the web UI does not
        listen on from outside (web.listen = "${cfg.web.listen}" is a loopback address).
      '';

    services.immich-usb-backup.settings = {
      disks.approved = cfg.approvedDisks;
      notify.urls_file = lib.mkIf (cfg.notificationUrlsFile != null) cfg.notificationUrlsFile;
      web = lib.mkIf cfg.web.enable {
        listen = cfg.web.listen;
        password_file = cfg.web.passwordFile;
      };
    };

    # Disks are mounted, unmounted and powered off through UDisks2; exFAT needs the
    # kernel driver (or exfatprogs to prepare a disk).
    services.udisks2.enable = true;
    boot.supportedFilesystems = [ "exfat" ];
    services.udev.packages = [ cfg.package ];
    environment.systemPackages = [
      cfg.package
      pkgs.exfatprogs
    ];
    environment.etc."immich-usb-backup/config.toml".source = configFile;

    # ReadWritePaths= needs a state dir of another place to exist before the unit starts.
    systemd.tmpfiles.rules = lib.optional (!stateDirIsDefault) "d ${stateDir} 0755 root root - -";

    # Also pulled in by the udev rule (SYSTEMD_WANTS) when a backup disk appears.
    systemd.services.immich-usb-backup = unitDependencies // {
      description = "Back up Immich onto an approved USB disk when it is plugged in";
      wantedBy = [ "multi-user.target" ];
      serviceConfig = serviceHardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${exe} -c ${configFile} daemon";
        Restart = "on-failure";
        RestartSec = 10;
        # the web UI's control socket: /run/immich-usb-backup/control.sock
        RuntimeDirectory = "immich-usb-backup";
        RuntimeDirectoryMode = "0755";
      };
    };

    # The group that may use the daemon's control socket and read the password's hash.
    users.groups.immich-usb-backup = lib.mkIf cfg.web.enable { };

    # The web UI: no root, a user made at each start, in that group (see
    # systemd/immich-usb-backup-web.service, whose comments say why each line is there).
    systemd.services.immich-usb-backup-web = lib.mkIf cfg.web.enable {
      description = "The immich-usb-backup web UI (a page for the backup disks, without root)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "immich-usb-backup.service" ];
      after = [
        "immich-usb-backup.service"
        "network.target"
      ];
      serviceConfig = lockedDown // {
        ExecStart = "${exe} -c ${configFile} web";
        Restart = "on-failure";
        RestartSec = 5;
        DynamicUser = true;
        SupplementaryGroups = [ "immich-usb-backup" ];
        ProtectHome = true;
        PrivateDevices = true;
        CapabilityBoundingSet = "";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        ProtectClock = true;
        ProtectProc = "invisible";
        SystemCallFilter = [
          "@system-service"
          "~@privileged @resources"
        ];
        UMask = "0077";
      };
    };

    networking.firewall.allowedTCPPorts = lib.mkIf (cfg.web.enable && cfg.web.openFirewall) [
      webPort
    ];

    systemd.services.immich-usb-backup-scheduled = lib.mkIf (cfg.schedule != null) (
      unitDependencies
      // {
        description = "Back up Immich onto every approved USB disk connected now";
        # A rebuild must not stop a backup that is running.
        restartIfChanged = false;
        serviceConfig = serviceHardening // {
          Type = "oneshot";
          ExecStart = "${exe} -c ${configFile} run approved --trigger schedule";
        };
      }
    );

    systemd.timers.immich-usb-backup-scheduled = lib.mkIf (cfg.schedule != null) {
      description = "Scheduled Immich backup onto the approved USB disks connected then";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.schedule;
        Persistent = true;
      };
    };
  };
}
