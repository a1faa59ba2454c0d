#!/usr/bin/env bash
# Writes the upgrade fixture: a data directory made by an earlier release, which
# tests/tests/upgrade.rs opens with the current one. Run it with that release's binary:
#
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build -p smartdb-cli)
#   tests/data/upgrade/make.sh <target>/debug/smartdb tests/data/upgrade/<commit>.tar.gz
#
# It starts `smartdb up` on a fresh directory, fills it through the public API (grpcurl), stops
# the cluster as an operator would (SIGINT) and packs the directory without logs and pid files.
set -euo pipefail
bin="$(realpath "$1")"
out="$(realpath -m "$2")"
work="$(mktemp -d)"
data="$work/data"
mkdir -p "$data"
"$bin" up --data-dir "$data" --gateway-port 0 --search-port 0 --ingest-port 0 --embed-port 0 \
  >"$work/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 600); do
  if [ -f "$data/cluster.json" ] && grep -q "smartdb is ready" "$work/up.log"; then break; fi
  sleep 0.5
done
gw="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"]["gateway"]["grpc"])' "$data/cluster.json")"
call() { grpcurl -plaintext -max-time 120 -d "$2" "$gw" "smartdb.v1.$1"; }

call KnowledgeBaseService/CreateKnowledgeBase '{"name":"notes","description":"field notes"}'
call KnowledgeBaseService/CreateKnowledgeBase '{"name":"archive"}'
call DocumentService/IngestText '{"knowledge_base":"notes","title":"Tides","wait":true,
  "metadata":{"topic":"sea","year":"2019"},
  "text":"Spring tides happen twice a month, when the sun and the moon pull in line. Neap tides follow a week later, when they pull at right angles."}'
call DocumentService/IngestText '{"knowledge_base":"notes","wait":true,"format":"TEXT_FORMAT_MARKDOWN",
  "metadata":{"topic":"bees","year":"2021"},
  "text":"# Beekeeping\n\n## Swarms\n\nA swarm leaves the hive with the old queen when the colony runs out of room.\n\n## Honey\n\nBees fan their wings to evaporate nectar until it is ripe honey."}'
doomed="$(call DocumentService/IngestText '{"knowledge_base":"notes","wait":true,
  "text":"This note about volcanic glass was deleted before the upgrade."}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["document"]["id"])')"
call DocumentService/DeleteDocument "{\"knowledge_base\":\"notes\",\"document_id\":\"$doomed\"}"
call DocumentService/IngestText '{"knowledge_base":"archive","wait":true,
  "text":"The 1859 Carrington event set telegraph paper on fire across North America."}'
call SearchService/Search '{"knowledge_base":"notes","query":"why do bees fan their wings"}' >/dev/null

kill -INT $up
wait $up || true
rm -f "$data/cluster.json" "$data"/*.pid "$data"/*.log
# The index preallocates large zero-filled files: store them sparse (a few KiB, not 250 MB).
find "$data" -type f -size +64k -exec fallocate --dig-holes {} \;
tar --sparse -C "$data" -czf "$out" .
echo "wrote $out ($(du -h "$out" | cut -f1))"
