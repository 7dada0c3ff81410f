#!/bin/sh
# The init container `config` of each flatmesh pod (POSIX sh; busybox sh and sed in the image).
#
# Writes /etc/flatmesh/flatmesh.toml from the template /etc/flatmesh-template/flatmesh.toml,
# replacing ${POD_NAME} and ${POD_NAMESPACE} with this pod's (the agent expands no variables in
# its config), then checks the
# result with `flatmesh config`, so a bad config stops the pod here with a message that names
# the key. It also refuses to start while a token in the Secret flatmesh-tokens is still the
# placeholder of deploy/k8s/base/kustomization.yaml: /admin is reachable by every client of
# port 8000, and its token is all that guards it (the mesh token likewise guards the internal
# endpoints the nodes call each other on).
#
# Variables: POD_NAME, POD_NAMESPACE (downward API), FLATMESH_ADMIN_TOKEN,
# FLATMESH_METRICS_TOKEN, FLATMESH_MESH_TOKEN (the Secret); TEMPLATE and OUTPUT override the
# paths (for tests).
set -eu
TEMPLATE=${TEMPLATE:-/etc/flatmesh-template/flatmesh.toml}
OUTPUT=${OUTPUT:-/etc/flatmesh/flatmesh.toml}

fail() { echo "render-config: $*" >&2; exit 1; }
placeholder() {
  case "$2" in
    "") fail "$1 is empty: set it in the Secret flatmesh-tokens (see deploy/k8s/base/kustomization.yaml)" ;;
    replace-me*) fail "$1 is still the placeholder: put a real token in the Secret flatmesh-tokens (see deploy/k8s/base/kustomization.yaml)" ;;
  esac
}
placeholder FLATMESH_ADMIN_TOKEN "${FLATMESH_ADMIN_TOKEN:-}"
placeholder FLATMESH_METRICS_TOKEN "${FLATMESH_METRICS_TOKEN:-}"
placeholder FLATMESH_MESH_TOKEN "${FLATMESH_MESH_TOKEN:-}"
[ -n "${POD_NAME:-}" ] || fail "POD_NAME is not set (downward API metadata.name)"
[ -n "${POD_NAMESPACE:-}" ] || fail "POD_NAMESPACE is not set (downward API metadata.namespace)"
# Pod and namespace names are DNS labels: nothing in them needs escaping for sed or TOML.
case "$POD_NAME$POD_NAMESPACE" in *[!a-z0-9.-]*) fail "unexpected characters in $POD_NAME / $POD_NAMESPACE" ;; esac

sed -e "s|\${POD_NAME}|$POD_NAME|g" -e "s|\${POD_NAMESPACE}|$POD_NAMESPACE|g" "$TEMPLATE" > "$OUTPUT.tmp"
if grep -q '\${' "$OUTPUT.tmp"; then
  fail "a \${...} is left in $OUTPUT after rendering: only \${POD_NAME} and \${POD_NAMESPACE} are replaced"
fi
mv "$OUTPUT.tmp" "$OUTPUT"
# `flatmesh config` prints the merged config (tokens only as "<set>"): not needed in the log.
if ! flatmesh config --config "$OUTPUT" > /dev/null; then
  fail "flatmesh config rejected $OUTPUT (the message above names the key)"
fi
echo "render-config: wrote $OUTPUT for node $POD_NAME in namespace $POD_NAMESPACE"
