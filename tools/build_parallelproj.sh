#!/usr/bin/env bash
# Build parallelproj from source and install it into a Python virtual environment (no conda).
#
#   tools/build_parallelproj.sh                      # fresh clones of the two GitHub repositories
#   PARALLELPROJ_SRC=../shared/vendor tools/build_parallelproj.sh
#
# What it installs into $VENV (default .venv):
#   lib/libparallelproj.so*            the C++/OpenMP (or CUDA) Joseph projectors
#   site-packages/parallelproj_core*   the nanobind extension; its rpath finds the library above,
#                                      so no LD_LIBRARY_PATH is needed
#   site-packages/parallelproj/        the pure-Python package (RegularPolygonPETProjector, ...)
# with a .dist-info for each (pip list / pip uninstall parallelproj parallelproj-core work), and the
# build dependencies from PyPI: cmake>=3.31, ninja, nanobind, array-api-compat.
#
# Variables:
#   PARALLELPROJ_SRC    where the sources are; empty: git clone (PARALLELPROJ_LIB_REPO at
#                       PARALLELPROJ_LIB_REF, PARALLELPROJ_PY_REPO at PARALLELPROJ_PY_REF; the refs
#                       default to the commits of the vendored snapshots). Otherwise one of
#                         - a folder holding libparallelproj*.tar.gz and parallelproj*.tar.gz,
#                         - a folder holding the source trees libparallelproj/ and parallelproj/,
#                         - a .tar.gz archive of either.
#   PARALLELPROJ_CUDA   auto (default) | ON | OFF. A CUDA build of libparallelproj has no CPU
#                       kernels (host arrays are copied to the GPU), so "auto" builds CUDA only
#                       when nvcc, the CUDA runtime headers AND a GPU (nvidia-smi -L) are present.
#   PARALLELPROJ_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES (default: native with a GPU, else all-major).
#   PARALLELPROJ_BUILD  build folder (default .parallelproj, git-ignored); JOBS: parallel jobs.
#   VENV                the virtual environment to install into (default .venv).
set -euo pipefail

VENV=${VENV:-.venv}
BUILD=${PARALLELPROJ_BUILD:-.parallelproj}
SRC=${PARALLELPROJ_SRC:-}
CUDA=${PARALLELPROJ_CUDA:-auto}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
LIB_REPO=${PARALLELPROJ_LIB_REPO:-https://github.com/KUL-recon-lab/libparallelproj.git}
PY_REPO=${PARALLELPROJ_PY_REPO:-https://github.com/KUL-recon-lab/parallelproj.git}
LIB_REF=${PARALLELPROJ_LIB_REF:-6db4ae550b1fd7327ec08e8b2f0eb45cb16c24a7}
PY_REF=${PARALLELPROJ_PY_REF:-9613dda6bb8ed6eddfd8c363f62e271e6b805d23}

say() { echo "[parallelproj] $*"; }
die() { echo "[parallelproj] error: $*" >&2; exit 1; }

PY="$VENV/bin/python"
[ -x "$PY" ] || die "no Python at $PY (run make install first, or set VENV)"
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
t0=$(date +%s)

# -- 1. sources -> $BUILD/src/{libparallelproj,parallelproj} ---------------------------------
rm -rf "$BUILD/src" "$BUILD/unpack"
mkdir -p "$BUILD/src" "$BUILD/unpack"

# the folder directly holding CMakeLists.txt + python/bindings.cpp (lib) or src/parallelproj (py)
find_tree() {  # $1: root, $2: lib|py
    local marker
    if [ "$2" = lib ]; then marker=python/bindings.cpp; else marker=src/parallelproj/__init__.py; fi
    find "$1" -path "*/$marker" -print 2>/dev/null | head -n 1 | sed "s#/$marker\$##"
}

unpack() {  # $1: archive -> its own folder under $BUILD/unpack
    local dest
    dest="$BUILD/unpack/$(basename "$1" | sed 's/\.\(tar\.gz\|tgz\|tar\)$//')"
    mkdir -p "$dest"
    tar -xf "$1" -C "$dest"
}

if [ -z "$SRC" ]; then
    command -v git >/dev/null || die "git is needed to clone the sources (or set PARALLELPROJ_SRC)"
    say "cloning $LIB_REPO @ $LIB_REF and $PY_REPO @ $PY_REF"
    for spec in "libparallelproj $LIB_REPO $LIB_REF" "parallelproj $PY_REPO $PY_REF"; do
        set -- $spec
        git clone --quiet --filter=blob:none "$2" "$BUILD/unpack/$1"
        git -C "$BUILD/unpack/$1" -c advice.detachedHead=false checkout --quiet "$3"
    done
    ROOT="$BUILD/unpack"
elif [ -d "$SRC" ]; then
    ROOT=$(cd "$SRC" && pwd)
    for a in "$ROOT"/*.tar.gz "$ROOT"/*.tgz; do
        [ -f "$a" ] && unpack "$a"
    done
elif [ -f "$SRC" ]; then
    unpack "$SRC"
    ROOT="$BUILD/unpack"
else
    die "PARALLELPROJ_SRC=$SRC is neither a folder nor an archive"
fi

LIB_DIR=$(find_tree "$BUILD/unpack" lib); [ -n "$LIB_DIR" ] || LIB_DIR=$(find_tree "$ROOT" lib)
PY_DIR=$(find_tree "$BUILD/unpack" py); [ -n "$PY_DIR" ] || PY_DIR=$(find_tree "$ROOT" py)
[ -n "$LIB_DIR" ] || die "no libparallelproj sources (python/bindings.cpp) under ${SRC:-the clone}"
[ -n "$PY_DIR" ] || die "no parallelproj Python sources (src/parallelproj) under ${SRC:-the clone}"
cp -R "$LIB_DIR" "$BUILD/src/libparallelproj"
cp -R "$PY_DIR" "$BUILD/src/parallelproj"
LIB_VERSION=$(head -n 1 "$BUILD/src/libparallelproj/VERSION" | tr -d '[:space:]')
PY_VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$BUILD/src/parallelproj/pyproject.toml" | head -n 1)
say "libparallelproj $LIB_VERSION from $LIB_DIR"
say "parallelproj $PY_VERSION from $PY_DIR"

# The CMakeLists asks for Python 3.12 (its conda-forge builds); the code builds and runs on the
# venv's Python (>= 3.10), so the copy asks for that one instead.
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
sed -i "s/find_package(Python 3\.[0-9]*/find_package(Python $PYVER/" "$BUILD/src/libparallelproj/CMakeLists.txt"

# -- 2. build dependencies (PyPI) ----------------------------------------------------------------
say "build dependencies: cmake>=3.31 ninja nanobind array-api-compat"
"$PY" -m pip install --quiet "cmake>=3.31" ninja nanobind "array-api-compat>=1.7"
# where pip put them (the venv's bin/, or wherever an already installed copy lives)
CMAKE=$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))')
NINJA=$("$PY" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')

# -- 3. CUDA or not -----------------------------------------------------------------------------
NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; }
has_toolkit() {  # nvcc and the CUDA runtime headers (nvcc may be a wrapper outside the toolkit)
    [ -n "$NVCC" ] || return 1
    local root
    for root in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" ${CUDA_HOME:-} ${CUDA_PATH:-} /usr/local/cuda; do
        [ -f "$root/include/cuda_runtime.h" ] && return 0
        ls "$root"/targets/*/include/cuda_runtime.h >/dev/null 2>&1 && return 0
    done
    return 1
}
case "$CUDA" in
    auto|AUTO)
        if has_toolkit && has_gpu; then USE_CUDA=ON
        else
            USE_CUDA=OFF
            if has_toolkit; then say "CUDA toolkit found but no GPU: building the CPU (OpenMP) kernels"; fi
        fi ;;
    ON|on|1) USE_CUDA=ON; has_toolkit || die "PARALLELPROJ_CUDA=ON but no nvcc / CUDA toolkit found" ;;
    OFF|off|0) USE_CUDA=OFF ;;
    *) die "PARALLELPROJ_CUDA must be auto, ON or OFF, got $CUDA" ;;
esac
CUDA_ARGS=()
if [ "$USE_CUDA" = ON ]; then
    ARCHS=${PARALLELPROJ_CUDA_ARCHS:-$(has_gpu && echo native || echo all-major)}
    CUDA_ARGS=(-DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS")
fi
say "kernels: $([ "$USE_CUDA" = ON ] && echo "CUDA (${ARCHS})" || echo "CPU (OpenMP)")"

# -- 4. configure, build, install ----------------------------------------------------------------
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
LIBDIR="$VENV/lib"
RPATH="\$ORIGIN/$("$PY" -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$LIBDIR" "$SITE")"
rm -rf "$BUILD/cmake"
"$CMAKE" -S "$BUILD/src/libparallelproj" -B "$BUILD/cmake" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$NINJA" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_PYTHON=ON -DUSE_CUDA="$USE_CUDA" -DINSTALL_DEVEL=OFF \
    -DPython_EXECUTABLE="$PY" \
    -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_INSTALL_LIBDIR=lib \
    -DCMAKE_INSTALL_RPATH="$RPATH" \
    "${CUDA_ARGS[@]}" > "$BUILD/cmake-configure.log" 2>&1 \
    || { cat "$BUILD/cmake-configure.log"; die "cmake configure failed"; }
"$CMAKE" --build "$BUILD/cmake" -j "$JOBS" > "$BUILD/cmake-build.log" 2>&1 \
    || { tail -n 60 "$BUILD/cmake-build.log"; die "build failed (log: $BUILD/cmake-build.log)"; }
"$CMAKE" --install "$BUILD/cmake" > "$BUILD/cmake-install.log" 2>&1 \
    || { cat "$BUILD/cmake-install.log"; die "install failed"; }

# -- 5. the Python package, and a .dist-info for both --------------------------------------------
rm -rf "$SITE/parallelproj"
cp -R "$BUILD/src/parallelproj/src/parallelproj" "$SITE/parallelproj"
INSTALLED=$(sed -n 's/^-- \(Installing\|Up-to-date\): //p' "$BUILD/cmake-install.log")
"$PY" - "$SITE" "$PY_VERSION" "$LIB_VERSION" "$INSTALLED" <<'EOF'
import hashlib, base64, os, shutil, sys
from pathlib import Path

site, py_version, lib_version, installed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split()

def dist_info(name, version, files, summary):
    for old in site.glob(name.replace("-", "_") + "-*.dist-info"):
        shutil.rmtree(old)
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {summary}\n"
                                "License: Apache-2.0\n")
    (d / "INSTALLER").write_text("fbsemlib tools/build_parallelproj.sh\n")
    rows = []
    for f in [Path(p) for p in files] + [d / "METADATA", d / "INSTALLER"]:
        digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest()).rstrip(b"=").decode()
        rows.append(f"{os.path.relpath(f, site)},sha256={digest},{f.stat().st_size}")
    rows.append(f"{os.path.relpath(d / 'RECORD', site)},,")
    (d / "RECORD").write_text("\n".join(rows) + "\n")

py_files = [p for p in (site / "parallelproj").rglob("*") if p.is_file()]
dist_info("parallelproj", py_version, py_files, "parallelproj Python package (built from source)")
core = [p for p in installed if os.path.isfile(p) and not os.path.islink(p)]
core += [p for p in installed if os.path.islink(p)]
dist_info("parallelproj-core", lib_version, core, "libparallelproj and its parallelproj_core extension (built from source)")
EOF

# -- 6. check ------------------------------------------------------------------------------------
"$PY" - <<'EOF'
import parallelproj, parallelproj_core as c
print(f"[parallelproj] installed: parallelproj {parallelproj.__version__}, parallelproj_core {c.__version__}, "
      f"cuda_enabled={bool(c.cuda_enabled)}")
EOF
say "done in $(( $(date +%s) - t0 )) s"
