#!/bin/sh
# Compiles Main.java into Main.class beside it, for Java 17 (the stack's
# JRE). Needs a JDK (Debian's openjdk-17-jdk-headless); the class file is
# not committed: git keeps sources, not build output. The result is an
# exploded jar (META-INF/MANIFEST.MF + Main.class) ready to push.
set -e
cd "$(dirname "$0")"
javac --release 17 -d . Main.java
