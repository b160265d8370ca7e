#!/bin/bash
# The PostgreSQL commit-path measurements of docs/design.md ("PostgreSQL
# behind the seam"): a throwaway PostgreSQL 15 cluster on a loopback port,
# pg_test_fsync, then 2 rounds of the commit paths A (no order), B (a global
# order row, sync commit), C (the same, async commit) and D (C with a flush
# barrier beside it) at 1, 4 and 16 clients, 10 s each.
#
#   sudo bash benches/postgres/run.sh        (run as root: the cluster runs
#                                             as the postgres user)
#
# Results: results.tsv and logs/ in the work directory it prints; the
# cluster is stopped and its data removed at the end.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
W=${W:-$(mktemp -d /tmp/durus-pgbench.XXXXXX)}; chmod 755 "$W"
BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}; PORT=${PORT:-55432}
echo "work directory: $W"
cp -r "$HERE/scripts" "$W/" 
PSQL="$BIN/psql -X -q -h $W/sock -p $PORT -U postgres -d postgres"
export PGDATABASE=postgres
PGB="$BIN/pgbench -h $W/sock -p $PORT -U postgres"
cd $W
T=${T:-10}; ROUNDS=${ROUNDS:-"1 2"}
cleanup() { runuser -u postgres -- $BIN/pg_ctl -D $W/data -m fast -w stop >/dev/null 2>&1; cp $W/data/server.log $W/logs/ 2>/dev/null; rm -rf $W/data $W/sock $W/pg_test_fsync.tmp; }
trap cleanup EXIT
mkdir -p data sock logs; chown postgres:postgres data sock
runuser -u postgres -- $BIN/initdb -D $W/data -E UTF8 --no-locale >logs/initdb.log 2>&1 || exit 1
runuser -u postgres -- $BIN/pg_ctl -D $W/data -l $W/data/server.log -w start \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $W/sock -c fsync=on -c synchronous_commit=on -c shared_buffers=256MB -c max_connections=100" || exit 1
$PSQL <<SQL
create extension pgcrypto;
create table meta(id int primary key, last_tid bigint not null); insert into meta values (1,0);
create table records(oid bigint primary key, data bytea not null);
create table commits(tid bigint primary key, oids bytea not null);
create table flush(fe int primary key, n bigint not null); insert into flush values (1,0);
create sequence tid_seq;
insert into records select g, gen_random_bytes(200) from generate_series(1,100000) g;
vacuum analyze;
SQL
$PSQL -c "select count(*), sum(length(data)) from records" -c "show wal_sync_method" -c "show wal_writer_delay" -c "show commit_delay" -c "show full_page_writes" > logs/settings.txt
$BIN/pg_test_fsync -s 2 -f $W/pg_test_fsync.tmp > logs/pg_test_fsync.txt 2>&1
reset() { $PSQL -c "truncate commits" -c "update meta set last_tid=0" -c "alter sequence tid_seq restart" -c "vacuum records" -c "checkpoint"; }
echo -e "round\twl\tclients\ttps\tlat_ms\tfailed\tbarrier_tps\tbarrier_lat_ms" > results.tsv
get() { local f=$1; echo "$(grep -oP '^tps = \K[0-9.]+' $f)	$(grep -oP '^latency average = \K[0-9.]+' $f)	$(grep -oP '^number of failed transactions: \K[0-9]+' $f)"; }
for r in $ROUNDS; do
 for wl in A B C D; do
  for n in 1 4 16; do
   reset
   s=$wl; [ $wl = D ] && s=C
   log=logs/$wl-$n-r$r.txt
   if [ $wl = D ]; then
     $PGB -n -f scripts/flush.sql -c 1 -j 1 -T $T -M prepared > logs/D-flush-$n-r$r.txt 2>&1 &
     fp=$!
   fi
   $PGB -n -f scripts/$s.sql -c $n -j $n -T $T -M prepared --max-tries=10 -r > $log 2>&1
   if [ $wl = D ]; then wait $fp; fb=$(get logs/D-flush-$n-r$r.txt | cut -f1,2); else fb="	"; fi
   echo -e "$r\t$wl\t$n\t$(get $log)\t$fb" | tee -a results.tsv
  done
 done
done
$PSQL -c "select count(*) from records" -c "select pg_size_pretty(pg_database_size('postgres'))" >> logs/settings.txt
