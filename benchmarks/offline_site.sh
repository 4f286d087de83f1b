#!/usr/bin/env bash
# Pack what benchmarks/gpu_suite.sh needs beyond a CUDA PyTorch image, for a GPU host that
# has Python and PyTorch but no internet.  Here (pip and internet):
#
#   benchmarks/offline_site.sh OUTDIR      # writes OUTDIR/site.tar.xz and OUTDIR/ray.tar.xz
#
# There, from the repository's root (ray.tar.xz only for the fleet steps):
#
#   mkdir -p /tmp/site && for t in OUTDIR/*.tar.xz; do tar -xJf $t -C /tmp/site; done
#   export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_suite.sh results 570
#
# The wheels are chosen for the host's Python (PY_VERSION, default 3.12) on x86-64 Linux.
# The host is expected to hold torch, torchvision, numpy, opencv, pillow, PyYAML, tqdm and
# Ray's common dependencies (requests, click, filelock, msgpack, protobuf, aiohttp), as
# CUDA PyTorch images do; EXTRA="name==version ..." adds more.  sam2, its antlr4 runtime
# and iopath ship as source: they are built here as pure wheels (sam2 without its optional
# CUDA extension).  Ray goes in its own archive without the parts `streamtrack fleet` does
# not use (Java, RLlib, Tune, Train, Serve, Data, LLM, workflows): ~30 MB instead of ~70,
# so both archives fit where a transfer is limited to 64 MB.
set -euo pipefail
out=${1:?usage: benchmarks/offline_site.sh OUTDIR}
py=${PYTHON:-python3}
version=${PY_VERSION:-3.12}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The versions this environment has (the ones its tests passed with) where it has them.
pin() {
    local name version
    for name in "$@"; do
        version=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        echo "$name${version:+==$version}"
    done
}
# Published as source only: built here as pure wheels.
# shellcheck disable=SC2046  # one requirement per word
SAM2_BUILD_CUDA=0 "$py" -m pip wheel -q --no-deps -w "$work/wheels" $(pin sam2 antlr4-python3-runtime iopath)
# pip matches a manylinux tag exactly: name every one the wheels may carry.
binary=(--only-binary=:all: --python-version "$version" --implementation cp)
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    binary+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2046,SC2086  # one requirement per word; EXTRA is a list of requirements
"$py" -m pip download -q --no-deps "${binary[@]}" -d "$work/wheels" \
    $(pin av pyzmq pycocotools hydra-core omegaconf portalocker ray jsonschema jsonschema-specifications \
      referencing rpds-py) ${EXTRA:-}
"$py" -m pip install -q --no-deps --no-index --no-compile "${binary[@]}" --target "$work/site" "$work"/wheels/*.whl
unused=(jars rllib tune train serve data llm workflow)
cd "$work/site"
tar -cJf "$out/site.tar.xz" --exclude=./ray --exclude='./ray-*' .
tar -cJf "$out/ray.tar.xz" "${unused[@]/#/--exclude=./ray/}" ./ray ./ray-*.dist-info
du -h "$out"/*.tar.xz
echo "packages: $(ls "$work/wheels" | sed 's/-[0-9].*//' | sort | tr '\n' ' ')"
