\set o1 random(1, 100000)
\set o2 random(1, 100000)
\set o3 random(1, 100000)
\set o4 random(1, 100000)
\set o5 random(1, 100000)
\set o6 random(1, 100000)
\set o7 random(1, 100000)
\set o8 random(1, 100000)
\set o9 random(1, 100000)
\set o10 random(1, 100000)
BEGIN;
UPDATE meta SET last_tid = last_tid + 1 WHERE id = 1 RETURNING last_tid AS tid \gset
SELECT tid, oids FROM commits WHERE tid > :tid - 5;
INSERT INTO records(oid, data)
  SELECT DISTINCT ON (o) o, d
  FROM unnest(array[:o1, :o2, :o3, :o4, :o5, :o6, :o7, :o8, :o9, :o10]::bigint[],
              array[gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200), gen_random_bytes(200)]::bytea[]) AS t(o, d)
  ORDER BY o
  ON CONFLICT (oid) DO UPDATE SET data = EXCLUDED.data;
INSERT INTO commits(tid, oids) VALUES (:tid, int8send(:o1::bigint) || int8send(:o2::bigint) || int8send(:o3::bigint) || int8send(:o4::bigint) || int8send(:o5::bigint) || int8send(:o6::bigint) || int8send(:o7::bigint) || int8send(:o8::bigint) || int8send(:o9::bigint) || int8send(:o10::bigint));
END;
