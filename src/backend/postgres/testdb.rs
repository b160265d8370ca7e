//! Databases for the tests, in the cluster named by `DURUS_TEST_POSTGRES`
//! (`scripts/test.sh` starts one with `scripts/pg.sh`). A test without it
//! fails: it is never skipped.

use std::str::FromStr;

use postgres::{Client, Config, NoTls};

/// The URL of the test cluster's `postgres` database.
pub(crate) fn admin_url() -> String {
    std::env::var("DURUS_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "DURUS_TEST_POSTGRES is not set: the PostgreSQL tests need a cluster. \
             `scripts/pg.sh start DIR` starts one and prints its URL; scripts/test.sh does this"
        )
    })
}

/// A new empty database for the test `name` (dropped first if a run
/// before left it), and its configuration.
pub(crate) fn fresh(name: &str) -> Config {
    let admin = admin_url();
    let mut client = Client::connect(&admin, NoTls).expect("connect to DURUS_TEST_POSTGRES");
    let db = format!("durus_test_{name}_{}", std::process::id());
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let mut config = Config::from_str(&admin).unwrap();
    config.dbname(&db);
    config
}

/// The URL of the database of `config` (made by [`fresh`]).
pub(crate) fn url_of(config: &Config) -> String {
    format!(
        "{}/{}",
        admin_url().rsplit_once('/').unwrap().0,
        config.get_dbname().unwrap()
    )
}

/// Drops the durus-redb tables of the database of `config`.
pub(crate) fn drop_tables(config: &Config) {
    let mut client = config.connect(NoTls).unwrap();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS durus_meta, durus_order, durus_oids, durus_records, \
             durus_log, durus_front_ends, durus_alone, durus_aware",
        )
        .unwrap();
}
