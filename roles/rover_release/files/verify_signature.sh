#!/bin/sh
# Verify a staged release's manifest signature on the car, before the release is published or activated:
#     verify_signature.sh RELEASE_DIR ALLOWED_SIGNERS IDENTITY NAMESPACE [FILE]
# RELEASE_DIR/FILE.sig must be an SSH signature (ssh-keygen -Y sign -n NAMESPACE) of RELEASE_DIR/FILE
# (default manifest.json: the bundle's; firmware.json for the release's firmware) by a key that
# ALLOWED_SIGNERS (installed by provisioning) trusts for IDENTITY.
# Exit 0 when it is; else exit 1 with one line on stderr saying why. Needs only OpenSSH's ssh-keygen.
set -u
dir=$1 allowed=$2 identity=$3 namespace=$4 file=${5:-manifest.json}
what=bundle doc=manifest
[ "$file" = manifest.json ] || what=firmware doc=$file
fail() {
  echo "verify_signature: $*" >&2
  exit 1
}
command -v ssh-keygen >/dev/null 2>&1 || fail "ssh-keygen (OpenSSH client) is not installed on the car"
[ -f "$allowed" ] || fail "no $allowed on the car, so it trusts no bundle signing key: provision it (playbooks/provision.yml)"
[ -f "$dir/$file.sig" ] || fail "the $what is not signed: no $file.sig beside $file"
if ! out=$(ssh-keygen -Y verify -f "$allowed" -I "$identity" -n "$namespace" -s "$dir/$file.sig" \
  <"$dir/$file" 2>&1); then
  fail "$file.sig is not a good \"$namespace\" signature of $file by a key $allowed trusts for $identity (signed with another key, or the $doc changed after signing): $(printf '%s' "$out" | tr '\n' ' ')"
fi
printf '%s\n' "$out"
