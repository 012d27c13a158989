#!/usr/bin/env bash
# Build the WhaleFlux container images without a Docker daemon or a registry, from binaries
# already built, into OCI archives (an OCI image layout in a tar file):
#
#   <out>/whaleflux-operator.oci.tar    entrypoint /usr/local/bin/whaleflux, cmd [operator]
#   <out>/whaleflux-worker.oci.tar      entrypoint /usr/local/bin/whaleflux-worker
#   <out>/whaleflux-worker-cuda.oci.tar (--variant cuda)
#
# Each image is one layer from scratch: the binary (debug info stripped), the shared libraries
# `ldd` lists for it and the dynamic loader, /etc/passwd, /etc/group and /etc/nsswitch.conf with
# the user nonroot (65532:65532), /home/nonroot (the working directory), /tmp (1777) and the
# host's CA certificates when it has them; no shell, no package manager. The config runs the
# binary itself as PID 1 (exec form, no init) as user 65532:65532.
#
#   cargo build --release --locked -p whaleflux-operator -p whaleflux-worker
#   sudo scripts/build-images.sh                 # into target/images
#
# Options (defaults in brackets; relative paths are from the current directory):
#   --bin-dir DIR    where whaleflux and whaleflux-worker are [target/release of the repository;
#                    env WHALEFLUX_BIN_DIR]
#   --debug          the repository's target/debug instead
#   --out DIR        where the archives go [target/images of the repository; WHALEFLUX_IMAGE_DIR]
#   --variant V      worker variant: cpu, or cuda (sets NVIDIA_VISIBLE_DEVICES and
#                    NVIDIA_DRIVER_CAPABILITIES, so the NVIDIA container runtime mounts the GPUs
#                    and the driver's libraries, NVML included; the worker links no CUDA library
#                    yet) [cpu]
#   --only NAME      build only the operator or only the worker
#   --tag TAG        the images' tag [the workspace version in Cargo.toml; -cuda appended for
#                    the CUDA worker]
#   --builder B      buildah, umoci, or auto: buildah, and umoci when buildah fails
#                    [auto; WHALEFLUX_IMAGE_BUILDER]
#   --compress       gzip the layers with buildah (umoci always does; registries get them
#                    compressed anyway when pushed)
#   --no-strip       keep the binaries' debug info
# SOURCE_DATE_EPOCH, when set, is the images' creation time (with buildah also the files' times:
# the same binaries then give the same image digest).
#
# Needs root (or `buildah unshare` for a user with subordinate ids): the layer holds files owned
# by root and by nonroot. Needs buildah (Debian package `buildah`) or umoci (`umoci`); as root
# with apt-get it installs what is missing. buildah runs on its own storage in a temporary
# directory (vfs driver, chroot isolation) and touches no system-wide container storage.
#
# Then, for example:
#   skopeo copy oci-archive:target/images/whaleflux-worker.oci.tar docker://REGISTRY/whaleflux-worker:0.1.0
#   skopeo copy oci-archive:target/images/whaleflux-worker.oci.tar docker-daemon:whaleflux-worker:0.1.0
#   podman load -i target/images/whaleflux-worker.oci.tar
set -euo pipefail
HERE="$PWD"
cd "$(dirname "$0")/.."
# A path the caller gave, relative to the caller's directory.
from_caller() { [[ "$1" == /* ]] && printf '%s' "$1" || printf '%s/%s' "$HERE" "$1"; }

BIN_DIR="$(from_caller "${WHALEFLUX_BIN_DIR:-$PWD/target/release}")"
OUT="$(from_caller "${WHALEFLUX_IMAGE_DIR:-$PWD/target/images}")"
VARIANT=cpu
ONLY=""
TAG=""
BUILDER="${WHALEFLUX_IMAGE_BUILDER:-auto}"
COMPRESS=0
STRIP=1

die() {
  echo "build-images: $*" >&2
  exit 1
}
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin-dir) BIN_DIR="$(from_caller "${2:?--bin-dir needs a directory}")"; shift 2 ;;
    --debug) BIN_DIR="$PWD/target/debug"; shift ;;
    --out) OUT="$(from_caller "${2:?--out needs a directory}")"; shift 2 ;;
    --variant) VARIANT="${2:?--variant needs cpu or cuda}"; shift 2 ;;
    --only) ONLY="${2:?--only needs operator or worker}"; shift 2 ;;
    --tag) TAG="${2:?--tag needs a tag}"; shift 2 ;;
    --builder) BUILDER="${2:?--builder needs buildah, umoci or auto}"; shift 2 ;;
    --compress) COMPRESS=1; shift ;;
    --no-strip) STRIP=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
done
case "$VARIANT" in cpu | cuda) ;; *) die "--variant is cpu or cuda, not $VARIANT" ;; esac
case "$ONLY" in "" | operator | worker) ;; *) die "--only is operator or worker, not $ONLY" ;; esac
case "$BUILDER" in auto | buildah | umoci) ;; *) die "--builder is buildah, umoci or auto, not $BUILDER" ;; esac
[[ $EUID -eq 0 ]] || die "run as root (or under \`buildah unshare\`): the layer holds files owned by root and by 65532"

VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
SOURCE_URL="$(sed -n '/^\[workspace.package\]/,/^\[/s/^repository *= *"\(.*\)"/\1/p' Cargo.toml)"
LICENSE_ID="$(sed -n '/^\[workspace.package\]/,/^\[/s/^license *= *"\(.*\)"/\1/p' Cargo.toml)"
TAG="${TAG:-$VERSION}"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
# SOURCE_DATE_EPOCH (reproducible builds) sets the images' creation time; else now.
EPOCH="${SOURCE_DATE_EPOCH:-$(date +%s)}"
CREATED="$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
ARCH="$(uname -m)"
case "$ARCH" in x86_64) OCI_ARCH=amd64 ;; aarch64) OCI_ARCH=arm64 ;; *) OCI_ARCH="$ARCH" ;; esac

# Install what is missing (root with apt-get only); otherwise say what to install.
need() { # command package
  command -v "$1" >/dev/null && return 0
  if command -v apt-get >/dev/null; then
    echo "build-images: installing $2 (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >&2 \
      || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >&2; }
  fi
  command -v "$1" >/dev/null
}
need ldd libc-bin || die "ldd is missing"
if [[ $STRIP -eq 1 ]] && ! need strip binutils; then
  echo "build-images: strip not found; the binaries keep their debug info" >&2
  STRIP=0
fi
case "$BUILDER" in
  buildah) need buildah buildah || die "buildah is missing (apt-get install buildah)" ;;
  umoci) need umoci umoci || die "umoci is missing (apt-get install umoci)" ;;
  auto) need buildah buildah || need umoci umoci || die "neither buildah nor umoci is installed (apt-get install buildah)" ;;
esac

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "$OUT/.work.XXXXXX")"
BUILDAH_ROOT="$WORK/buildah"
# The vfs storage holds a full copy of every image; nothing in it is reused between runs.
cleanup() {
  if [[ -d "$BUILDAH_ROOT" ]]; then
    buildah "${BUILDAH_OPTS[@]}" rm --all >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
BUILDAH_OPTS=(--root "$BUILDAH_ROOT/root" --runroot "$BUILDAH_ROOT/run" --storage-driver vfs)
trap cleanup EXIT

# The root file system of an image with `binary` at /usr/local/bin, into directory `root`.
make_rootfs() { # binary root
  local bin="$1" root="$2" name
  name="$(basename "$bin")"
  mkdir -p "$root"/{etc,usr/local/bin,home/nonroot,tmp,proc,sys,dev}
  if [[ $STRIP -eq 1 ]]; then
    strip --strip-debug -o "$root/usr/local/bin/$name" "$bin"
  else
    cp "$bin" "$root/usr/local/bin/$name"
  fi
  chmod 0755 "$root/usr/local/bin/$name"
  # Shared libraries and the loader, each at the path ldd names (as a regular file).
  local deps
  deps="$(ldd "$bin" 2>&1)" || true
  if grep -q 'not found' <<<"$deps"; then
    die "$bin needs libraries this machine lacks: $(grep 'not found' <<<"$deps" | tr -s ' \t' ' ')"
  fi
  local lib
  while read -r lib; do
    [[ -n "$lib" ]] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps" | sort -u)
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    mkdir -p "$root/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  fi
  chmod 0755 "$root" "$root"/{etc,usr,usr/local,usr/local/bin,home,proc,sys,dev}
  chmod 0644 "$root"/etc/{passwd,group,nsswitch.conf}
  chmod 1777 "$root/tmp"
  chown -R 0:0 "$root"
  chown 65532:65532 "$root/home/nonroot"
  chmod 0750 "$root/home/nonroot"
}

# The image config both builders write; CFG_ENTRYPOINT and CFG_CMD are set by the caller.
image_config() { # name description port
  CFG_NAME="$1" CFG_DESC="$2" CFG_PORT="$3"
  CFG_ENV=("PATH=/usr/local/bin:/usr/bin:/bin" "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
  CFG_LABELS=(
    "org.opencontainers.image.title=$CFG_NAME"
    "org.opencontainers.image.description=$CFG_DESC"
    "org.opencontainers.image.version=$TAG"
    "org.opencontainers.image.revision=$REVISION"
    "org.opencontainers.image.source=$SOURCE_URL"
    "org.opencontainers.image.url=$SOURCE_URL"
    "org.opencontainers.image.licenses=$LICENSE_ID"
    "org.opencontainers.image.created=$CREATED"
    "org.opencontainers.image.vendor=WhaleFlux"
  )
  if [[ "$CFG_NAME" == whaleflux-worker && "$VARIANT" == cuda ]]; then
    # What the NVIDIA container runtime reads to inject the GPUs and the driver's libraries.
    CFG_ENV+=("NVIDIA_VISIBLE_DEVICES=all" "NVIDIA_DRIVER_CAPABILITIES=compute,utility")
    CFG_LABELS+=("io.whaleflux.variant=cuda")
  else
    CFG_LABELS+=("io.whaleflux.variant=cpu")
  fi
}

build_buildah() { # rootfs archive ref
  local root="$1" archive="$2" ref="$3" c
  local B=(buildah "${BUILDAH_OPTS[@]}")
  c="$("${B[@]}" from --quiet --isolation chroot --name "wf-$RANDOM$RANDOM" scratch)" || return 1
  # The file system goes in as a tar archive, so owners and modes are kept exactly.
  tar --numeric-owner -C "$root" -cf "$WORK/rootfs.tar" . || return 1
  "${B[@]}" add --quiet "$c" "$WORK/rootfs.tar" / || return 1
  local args=(--entrypoint "$(json_words "${CFG_ENTRYPOINT[@]}")"
    --cmd "$(json_words "${CFG_CMD[@]}")" --user 65532:65532
    --workingdir /home/nonroot --stop-signal SIGTERM --port "$CFG_PORT/tcp"
    --os linux --arch "$OCI_ARCH" --author "WhaleFlux" --created-by "scripts/build-images.sh")
  local e l
  for e in "${CFG_ENV[@]}"; do args+=(--env "$e"); done
  for l in "${CFG_LABELS[@]}"; do args+=(--label "$l"); done
  "${B[@]}" config "${args[@]}" "$c" || return 1
  local commit=(--quiet --format oci --rm --timestamp "$EPOCH" --identity-label=false)
  if [[ $COMPRESS -eq 1 ]]; then commit+=(--disable-compression=false); else commit+=(--disable-compression); fi
  rm -f "$archive"
  "${B[@]}" commit "${commit[@]}" "$c" "oci-archive:$archive:$ref" >/dev/null || return 1
}

build_umoci() { # rootfs archive ref
  local root="$1" archive="$2" ref="$3" layout="$WORK/layout" w e l
  rm -rf "$layout" "$WORK/bundle"
  umoci init --layout "$layout" || return 1
  umoci new --image "$layout:build" || return 1
  # unpack + repack, not `umoci insert`: umoci 0.4.7 (Debian 12) leaves an inserted layer's
  # tar unterminated and its last file short (umoci#436, fixed in umoci#534).
  umoci unpack --image "$layout:build" "$WORK/bundle" || return 1
  cp -a "$root/." "$WORK/bundle/rootfs/" || return 1
  umoci repack --image "$layout:build" --history.created_by "scripts/build-images.sh" \
    --history.author WhaleFlux "$WORK/bundle" || return 1
  rm -rf "$WORK/bundle"
  # umoci takes one --config.entrypoint/--config.cmd per word.
  local args=()
  for w in "${CFG_ENTRYPOINT[@]}"; do args+=(--config.entrypoint "$w"); done
  for w in "${CFG_CMD[@]}"; do args+=(--config.cmd "$w"); done
  args+=(--config.user 65532:65532 --config.workingdir /home/nonroot --config.stopsignal SIGTERM
    --config.exposedports "$CFG_PORT/tcp" --os linux --architecture "$OCI_ARCH"
    --author WhaleFlux --created "$CREATED" --no-history)
  for e in "${CFG_ENV[@]}"; do args+=(--config.env "$e"); done
  for l in "${CFG_LABELS[@]}"; do args+=(--config.label "$l"); done
  umoci config --image "$layout:build" "${args[@]}" || return 1
  # The archive's ref name is name:tag, as buildah writes it.
  umoci tag --image "$layout:build" "$ref" || return 1
  umoci rm --image "$layout:build" || return 1
  umoci gc --layout "$layout" || return 1
  rm -f "$archive"
  tar --numeric-owner --owner=0 --group=0 -C "$layout" -cf "$archive" . || return 1
}

# A JSON array of the words given (they hold no quotes or backslashes).
json_words() {
  local out="" w
  for w in "$@"; do out+="${out:+,}\"$w\""; done
  printf '[%s]' "$out"
}

build_image() { # binary name archive-name description port
  local bin="$1" name="$2"
  [[ -x "$bin" ]] || die "$bin is missing: cargo build --release --locked -p whaleflux-operator -p whaleflux-worker (or pass --bin-dir/--debug)"
  image_config "$name" "$4" "$5"
  local root="$WORK/rootfs-$3" archive="$OUT/$3.oci.tar" ref="$name:$TAG"
  [[ "$name" != whaleflux-worker || "$VARIANT" == cpu ]] || ref+="-$VARIANT"
  local t0=$SECONDS used=""
  rm -rf "$root"
  make_rootfs "$bin" "$root"
  if [[ "$BUILDER" != umoci ]] && command -v buildah >/dev/null; then
    if build_buildah "$root" "$archive" "$ref" 2>"$WORK/buildah.err"; then
      used=buildah
    else
      echo "build-images: buildah failed:" >&2
      cat "$WORK/buildah.err" >&2
      [[ "$BUILDER" == auto ]] || die "buildah could not build $name"
      need umoci umoci || die "buildah failed and umoci is not installed (apt-get install umoci)"
    fi
  fi
  if [[ -z "$used" ]]; then
    build_umoci "$root" "$archive" "$ref" >"$WORK/umoci.log" 2>&1 \
      || { cat "$WORK/umoci.log" >&2; die "umoci could not build $name"; }
    used=umoci
  fi
  rm -rf "$root"
  printf '%s\t%s\t%s MiB\t%s s\t%s\n' "$archive" "$ref" \
    "$(($(stat -c %s "$archive") / 1048576))" "$((SECONDS - t0))" "$used"
}

if [[ -z "$ONLY" || "$ONLY" == operator ]]; then
  CFG_ENTRYPOINT=(/usr/local/bin/whaleflux)
  CFG_CMD=(operator)
  build_image "$BIN_DIR/whaleflux" whaleflux-operator whaleflux-operator \
    "WhaleFlux operator: plans LLM splits over GPU pools and runs the worker groups" 8080
fi
if [[ -z "$ONLY" || "$ONLY" == worker ]]; then
  archive=whaleflux-worker
  [[ "$VARIANT" == cpu ]] || archive+="-$VARIANT"
  CFG_ENTRYPOINT=(/usr/local/bin/whaleflux-worker)
  CFG_CMD=(serve --model /models/model.gguf)
  build_image "$BIN_DIR/whaleflux-worker" whaleflux-worker "$archive" \
    "WhaleFlux worker: serves a GGUF model over the OpenAI API ($VARIANT)" 8000
fi
