#!/usr/bin/env bash
# The installed `tnt` (a wheel in the venv $1), run from an empty folder: no checkout on the path.
set -euo pipefail
venv="$1"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
"$venv/bin/tnt" train --recipe quickstart --epochs 1 --out run
"$venv/bin/python" - <<'PY'
from tntcli.transfer import transfer_config
import tntcli
assert "site-packages" in tntcli.__file__, tntcli.__file__       # the wheel, not a checkout
cfg = transfer_config("run/best.pt", overrides={"data.data": "cifar10"})   # reads no data
assert (cfg.train.epochs, cfg.model.img_size, cfg.data.crop_pct) == (64, 384, 1.0), cfg
print("transfer --data cifar10 uses the shipped transfer/cifar10 recipe")
PY
rc=0; "$venv/bin/tnt" train --recipe no-such-recipe --data digits 2>err.txt || rc=$?
if [ "$rc" -ne 2 ] || ! grep -q "recipe 'no-such-recipe' not found" err.txt; then
    echo "a recipe name that does not exist must be a one-line error, exit 2 (got $rc): $(cat err.txt)" >&2; exit 1
fi
echo "wheel check passed"
