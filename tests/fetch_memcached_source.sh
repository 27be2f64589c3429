#!/usr/bin/env bash
# Fetch memcached 1.6.18's source from Debian 12's archive and unpack it where
# tests/test_memcached_suite.py reads memcached's own tests (its t/ folder):
# $MEMG_MEMCACHED_SOURCE, by default ~/.cache/memg/memcached-1.6.18.  Nothing is
# built: memg stands in for the server.  Run as root on Debian 12 (.ci/run does): apt
# needs deb-src entries for the same suites as its deb ones, which this adds.
set -euo pipefail
VERSION=1.6.18
dest=${MEMG_MEMCACHED_SOURCE:-${XDG_CACHE_HOME:-$HOME/.cache}/memg/memcached-$VERSION}
if [ -f "$dest/t/lib/MemcachedTest.pm" ]; then
    exit 0
fi

if ! (apt-cache showsrc memcached 2>/dev/null || true) | grep -q "^Version: $VERSION-"; then
    # A deb-src copy of the Debian entries, in whichever format the machine has.
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            > /etc/apt/sources.list.d/memg-deb-src.sources
    fi
    if [ -f /etc/apt/sources.list ]; then
        sed -n 's/^deb \(.*debian.*\)/deb-src \1/p' /etc/apt/sources.list \
            > /etc/apt/sources.list.d/memg-deb-src.list
    fi
    apt-get update -qq
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get source --download-only -qq memcached)
mkdir "$work/source"
tar -xJf "$work/memcached_$VERSION.orig.tar.xz" -C "$work/source"
grep -q "\[$VERSION\]" "$work/source/memcached-$VERSION/version.m4"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$work/source/memcached-$VERSION" "$dest"
echo "memcached $VERSION's source (for its t/ tests) is in $dest"
