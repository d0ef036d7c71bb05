#!/bin/sh
# Is a worker's per-core kernel rate lower when the other core computes too?
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
export PYTHONUNBUFFERED=1
echo "== alone, core 0, fwd"; TAG=alone taskset -c 0 .venv/bin/python "$here/shape_probe.py"
echo "== both cores at once, fwd"; TAG=core0 taskset -c 0 .venv/bin/python "$here/shape_probe.py" & TAG=core1 taskset -c 1 .venv/bin/python "$here/shape_probe.py"; wait
echo "== alone, core 0, vjp"; VJP=1 N2=64 TILES=64 TAG=alone taskset -c 0 .venv/bin/python "$here/shape_probe.py"
echo "== both, vjp"; VJP=1 N2=64 TILES=64 TAG=core0 taskset -c 0 .venv/bin/python "$here/shape_probe.py" & VJP=1 N2=64 TILES=64 TAG=core1 taskset -c 1 .venv/bin/python "$here/shape_probe.py"; wait
