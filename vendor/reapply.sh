#!/usr/bin/env bash
# Hetero's edits to burn, as patches against the published crates.
#
# vendor/ holds patched copies of five burn crates ([patch.crates-io] in the
# workspace's Cargo.toml). What Hetero changed in each is vendor/patches/CRATE.diff:
# the difference between the crate as crates.io publishes it and vendor/CRATE.
# Hetero's own kernels live in crates/kernels; the patches hold the hooks that call
# them and the few fixes burn needs (vendor/README.md says which and why).
#
#   vendor/reapply.sh check     # fresh published copies + the patches == vendor/, and it builds
#   NO_BUILD=1 vendor/reapply.sh check   # the comparison alone (CI builds vendor/ anyway)
#   vendor/reapply.sh write     # rewrite vendor/patches/ from vendor/ (after editing vendor/)
#   VERSION=0.22.0 vendor/reapply.sh apply
#                               # the patches on a newer burn, into vendor/; then build
#
# The published crates come through cargo itself (a scratch project and
# `cargo fetch`), so this works wherever the workspace builds.
set -euo pipefail
cd "$(dirname "$0")/.."

CRATES=(burn-flex burn-autodiff burn-backend burn-dispatch burn-tch)
VERSION=${VERSION:-0.21.0}
MODE=${1:-check}
# Files cargo adds to a downloaded crate, dropped where vendor/ did not keep them.
NOT_KEPT=(.cargo_vcs_info.json Cargo.toml.orig Cargo.lock)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copies the published $VERSION of every crate into $work/fresh/CRATE.
fetch() {
    mkdir -p "$work/scratch/src" "$work/fresh"
    {
        printf '[package]\nname = "scratch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n'
        for c in "${CRATES[@]}"; do printf '%s = "=%s"\n' "$c" "$VERSION"; done
    } > "$work/scratch/Cargo.toml"
    echo 'fn main() {}' > "$work/scratch/src/main.rs"
    cargo fetch --quiet --manifest-path "$work/scratch/Cargo.toml"
    cargo metadata --quiet --format-version 1 --manifest-path "$work/scratch/Cargo.toml" |
        python3 -c '
import json, os, sys
wanted = set(sys.argv[1:])
for p in json.load(sys.stdin)["packages"]:
    if p["name"] in wanted:
        print(p["name"], os.path.dirname(p["manifest_path"]))
' "${CRATES[@]}" |
        while read -r name dir; do
            cp -r "$dir" "$work/fresh/$name"
            for f in "${NOT_KEPT[@]}"; do
                [ -e "vendor/$name/$f" ] || rm -f "$work/fresh/$name/$f"
            done
        done
    for c in "${CRATES[@]}"; do
        [ -d "$work/fresh/$c" ] || { echo "cargo did not fetch $c $VERSION" >&2; exit 1; }
    done
}

# Applies vendor/patches/CRATE.diff to each fresh copy; a hunk that does not apply
# is named with its .rej file.
apply_patches() {
    local failed=0
    for c in "${CRATES[@]}"; do
        if ! patch --quiet --forward -p1 -d "$work/fresh/$c" < "vendor/patches/$c.diff"; then
            echo "$c: some hunks do not apply to $VERSION:" >&2
            find "$work/fresh/$c" -name '*.rej' | sed 's/^/  /' >&2
            failed=1
        fi
    done
    return $failed
}

case "$MODE" in
write)
    fetch
    mkdir -p vendor/patches
    root=$PWD
    for c in "${CRATES[@]}"; do
        # a/ the published crate, b/ ours; diff exits 1 when they differ, which they do.
        # Timestamps are dropped from the headers, so a rewrite changes only what changed.
        (cd "$work" && rm -rf a b && cp -r "fresh/$c" a && cp -r "$root/vendor/$c" b && diff -ruN a b || true) |
            sed -E 's/^(---|\+\+\+) ([^\t]*)\t.*/\1 \2/' > "vendor/patches/$c.diff"
        echo "vendor/patches/$c.diff: $(grep -c '^[-+][^-+]' "vendor/patches/$c.diff") changed lines"
    done
    ;;
check)
    fetch
    apply_patches
    for c in "${CRATES[@]}"; do
        if ! diff -r "$work/fresh/$c" "vendor/$c" > "$work/$c.left"; then
            echo "$c: the published crate with vendor/patches/$c.diff is not vendor/$c:" >&2
            head -20 "$work/$c.left" >&2
            echo "(after editing vendor/, run: vendor/reapply.sh write)" >&2
            exit 1
        fi
    done
    echo "vendor/: the published $VERSION crates with vendor/patches/ applied, file for file"
    if [ -z "${NO_BUILD:-}" ]; then
        cargo check --quiet -p hetero-models
        echo "and it builds (cargo check -p hetero-models)"
    fi
    ;;
apply)
    fetch
    apply_patches || { echo "nothing in vendor/ was changed" >&2; exit 1; }
    for c in "${CRATES[@]}"; do
        rm -rf "vendor/$c"
        cp -r "$work/fresh/$c" "vendor/$c"
    done
    echo "vendor/ now holds burn $VERSION with Hetero's patches; set burn's versions in Cargo.toml to =$VERSION, then:"
    cargo check -p hetero-models
    ;;
*)
    echo "usage: vendor/reapply.sh [check|write|apply]" >&2
    exit 2
    ;;
esac
