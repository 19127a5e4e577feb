#!/usr/bin/env bash
# Prepare Testing/device_check.py for a lent GPU machine, here, in the repository root:
# that machine has PyTorch, h5py, scikit-learn, SciPy, Pillow and tqdm but not MONAI, pydicom or
# pytorch-metric-learning, cannot download anything, and receives only the repository (64 MiB
# with what is carried). This fetches the three wheels (the versions tested here) into .whl/,
# copies the NIH images into .device/ (both git-ignored through .git/info/exclude) and prints
# the run to give the device tool, with carry [".whl", ".device"]. About 4 minutes there.
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.device/; do
    grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
rm -rf .whl .device
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl monai==1.6.1 pydicom==3.0.2 pytorch-metric-learning==2.9.0
mkdir -p .device
cp -r "${SHARED_DATA:-../shared/data}/cxr14-subset-64px" .device/
# What travels: tracked files, untracked ones git does not ignore, and the two carried folders.
bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- | tail -1 | cut -f1)
bytes=$((bytes + $(du -sb .whl .device | awk '{s += $1} END {print s}')))
echo "to send: $((bytes / 1048576)) MiB of the 64 MiB a call may carry"
if [ "$bytes" -gt $((62 * 1048576)) ]; then
    echo "too close to the limit: remove untracked files first (git status)" >&2
    exit 1
fi
cat <<'RUN'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1; export PYTHONPATH=/tmp/site:$PWD/SubjectFingerprint:$PWD/FingerprintTraining PYTHONUNBUFFERED=1; set -o pipefail; python3 Testing/device_check.py --data .device --out /tmp/device-check 2>&1 | tee $OUT/device_check.md
RUN
