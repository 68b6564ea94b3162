# The flake lives in nix/ of the repository: `nix build ./nix` in a checkout, or as an
# input the repository's URL with `?dir=nix`. A flake is built from the files Git tracks,
# so new files must be `git add`ed before `nix build` sees them. The package's source is
# the whole repository (package.nix reads ../.).
{
  description = "Back up a self-hosted Immich server onto an approved exFAT USB disk when it is plugged in";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        immich-usb-backup = pkgs.callPackage ./package.nix { };
        default = immich-usb-backup;
      });

      # For a nixpkgs of your own: pkgs.immich-usb-backup, built with that nixpkgs.
      overlays.default = final: _prev: {
        immich-usb-backup = final.callPackage ./package.nix { };
      };

      # The module, its package defaulting to this flake's (built with the nixpkgs this
      # flake pins; `inputs.immich-usb-backup.inputs.nixpkgs.follows = "nixpkgs";` builds
      # it with the system's). On another platform it is built with the system's nixpkgs.
      # Setting services.immich-usb-backup.package still wins.
      nixosModules.immich-usb-backup =
        { lib, pkgs, ... }:
        {
          imports = [ ./module.nix ];
          services.immich-usb-backup.package = lib.mkDefault (
            self.packages.${pkgs.stdenv.hostPlatform.system}.default or (pkgs.callPackage ./package.nix { })
          );
        };
      nixosModules.default = self.nixosModules.immich-usb-backup;

      checks = forAllSystems (pkgs: {
        immich-usb-backup = self.packages.${pkgs.stdenv.hostPlatform.system}.immich-usb-backup;
      });
    };
}
