#!/bin/sh
# A stand-in for basin-builder, for tests only: the same flags, exit codes
# (222 detect, 223 compile, 224 release) and outputs (droplet.tgz with
# staging_info.yml, result.json), running the buildpacks' bin/detect,
# bin/compile and bin/release.
set -u
build='' bps='' order='' skip='' cache='' droplet='' meta=''
for a in "$@"; do
	case "$a" in
	-buildDir=*) build=${a#*=} ;;
	-buildpacksDir=*) bps=${a#*=} ;;
	-buildpackOrder=*) order=${a#*=} ;;
	-skipDetect) skip=1 ;;
	-buildArtifactsCacheDir=*) cache=${a#*=} ;;
	-outputDroplet=*) droplet=${a#*=} ;;
	-outputMetadata=*) meta=${a#*=} ;;
	*) echo "fake builder: unknown flag $a" >&2; exit 2 ;;
	esac
done
echo "fake builder running as $(id -u):$(id -g) in $(pwd)"
chosen='' name=''
IFS=,
for k in $order; do
	if [ -n "$skip" ]; then chosen=$k; continue; fi # the last one is final
	if name=$("$bps/$k/bin/detect" "$build"); then chosen=$k; break; fi
done
unset IFS
if [ -z "$chosen" ]; then
	echo "None of the buildpacks detected a compatible application" >&2
	exit 222
fi
[ -n "$name" ] || name=$chosen
"$bps/$chosen/bin/compile" "$build" "$cache" || exit 223
start=$("$bps/$chosen/bin/release" "$build" | sed -n 's/^ *web: *//p' | head -n 1)
stage=$(dirname "$droplet")/stage
mkdir -p "$stage/app" "$stage/deps" "$stage/profile.d" "$stage/tmp" "$stage/logs" || exit 224
cp -a "$build/." "$stage/app/" || exit 224
printf '{"detected_buildpack":"%s","start_command":"%s"}\n' "$name" "$start" >"$stage/staging_info.yml"
tar -czf "$droplet" -C "$stage" . || exit 224
printf '{"detected_buildpack":"%s","buildpack_key":"%s","start_command":"%s","process_types":{"web":"%s"}}\n' \
	"$name" "$chosen" "$start" "$start" >"$meta"
