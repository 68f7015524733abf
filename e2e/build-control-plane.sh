#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd (the 3.6.x release Kubernetes pins) and helm from their Go
# modules through the Go module proxy, and caches them outside the clone:
#   ~/.cache/spendguard/control-plane/k8s-$K8S_VERSION/{kube-apiserver,kubectl,etcd,helm}
# No Docker and no release downloads: only the module proxy. Reruns with a warm cache are instant.
#
# Why a wrapper module: k8s.io/kubernetes requires its staging modules at v0.0.0 and maps them to
# ./staging with `replace`, which Go ignores in a dependency. The wrapper replaces each staging
# module with its published tag (kubernetes-$K8S_VERSION).
set -euo pipefail

K8S_VERSION="${SPENDGUARD_K8S_VERSION:-1.36.3}"
HELM_VERSION="${SPENDGUARD_HELM_VERSION:-v3.19.0}"
CACHE="${SPENDGUARD_CACHE:-$HOME/.cache/spendguard}"
OUT="$CACHE/control-plane/k8s-$K8S_VERSION"
MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
PATCH=$(echo "$K8S_VERSION" | cut -d. -f3)
# Staging modules are published as v0.MINOR.PATCH for Kubernetes v1.MINOR.PATCH.
STAGING_VERSION="v0.$MINOR.$PATCH"

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kubectl" ] && [ -x "$OUT/etcd" ] && [ -x "$OUT/helm" ]; then
  echo "control plane binaries cached in $OUT"
  exit 0
fi
command -v go >/dev/null || { echo "go is required to build the control plane" >&2; exit 1; }

mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
export GOFLAGS=-mod=mod CGO_ENABLED=0
go mod init local/spendguard-control-plane >/dev/null 2>&1
go mod edit -go=1.26.0

echo "resolving k8s.io/kubernetes v$K8S_VERSION staging modules"
GOMOD=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
for module in $(sed -n 's|^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*|\1|p' "$GOMOD"); do
  go mod edit -replace="$module=$module@$STAGING_VERSION"
done
# godebug lines of the main module are not inherited by dependents: copy them.
sed -n 's/^godebug[[:space:]]\+\(.*\)/\1/p' "$GOMOD" | while read -r setting; do go mod edit -godebug="$setting"; done

echo "fetching kube-apiserver, kubectl and etcd"
go get "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@v$K8S_VERSION"
ETCD_VERSION=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"

LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR"
echo "building kube-apiserver v$K8S_VERSION"
go build -ldflags "$LDFLAGS" -o "$OUT/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
echo "building kubectl v$K8S_VERSION"
go build -ldflags "$LDFLAGS" -o "$OUT/kubectl" k8s.io/kubernetes/cmd/kubectl
echo "building etcd $ETCD_VERSION"
go build -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3

echo "building helm $HELM_VERSION"
HELM_WORK=$(mktemp -d)
( cd "$HELM_WORK" && go mod init local/spendguard-helm >/dev/null 2>&1 && go mod edit -go=1.26.0 \
  && go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  && go build -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$OUT/helm" helm.sh/helm/v3/cmd/helm )
rm -rf "$HELM_WORK"

"$OUT/kube-apiserver" --version
"$OUT/etcd" --version | head -1
"$OUT/helm" version --short
echo "control plane binaries built into $OUT"
