#!/bin/sh
# Verify a staged release's manifest signature on the car, before the release is published or activated:
#     verify_signature.sh RELEASE_DIR ALLOWED_SIGNERS IDENTITY NAMESPACE
# RELEASE_DIR/manifest.json.sig must be an SSH signature (ssh-keygen -Y sign -n NAMESPACE) of
# RELEASE_DIR/manifest.json by a key that ALLOWED_SIGNERS (installed by provisioning) trusts for IDENTITY.
# Exit 0 when it is; else exit 1 with one line on stderr saying why. Needs only OpenSSH's ssh-keygen.
set -u
dir=$1 allowed=$2 identity=$3 namespace=$4
fail() {
  echo "verify_signature: $*" >&2
  exit 1
}
command -v ssh-keygen >/dev/null 2>&1 || fail "ssh-keygen (OpenSSH client) is not installed on the car"
[ -f "$allowed" ] || fail "no $allowed on the car, so it trusts no bundle signing key: provision it (playbooks/provision.yml)"
[ -f "$dir/manifest.json.sig" ] || fail "the bundle is not signed: no manifest.json.sig beside manifest.json"
if ! out=$(ssh-keygen -Y verify -f "$allowed" -I "$identity" -n "$namespace" -s "$dir/manifest.json.sig" \
  <"$dir/manifest.json" 2>&1); then
  fail "manifest.json.sig is not a good \"$namespace\" signature of manifest.json by a key $allowed trusts for $identity (signed with another key, or the manifest changed after signing): $(printf '%s' "$out" | tr '\n' ' ')"
fi
printf '%s\n' "$out"
