//! Open a store in-process, commit a small object graph, reopen, read it back.
//!
//! `cargo run --example local [PATH]` (default: a new temporary store).

use durus_redb::{Oid, Options, Record, RedbStorage, Storage};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(|| dir.path().join("local.redb"));

    let mut store = RedbStorage::open(&path, Options::default())?;
    let root = if store.load(Oid::ROOT).is_err() {
        store.new_oid()? // the first oid of an empty store is the root, 0
    } else {
        Oid::ROOT
    };
    let a = store.new_oid()?;
    let b = store.new_oid()?;
    store.begin();
    store.store(a, Record::new(a, b"object a", &[b]).into_bytes())?;
    store.store(b, Record::new(b, b"object b", &[]).into_bytes())?;
    store.store(root, Record::new(root, b"root", &[a]).into_bytes())?;
    store.end()?; // atomic; durable (in the commit log) when it returns; checkpoints: Periodic
    store.close()?;

    let mut store = RedbStorage::open(&path, Options::default())?;
    println!("{}: {} objects", path.display(), store.stats()?.objects);
    for record in store.traverse(Oid::ROOT) {
        let record = record?;
        println!(
            "oid {:>3}: {:?} -> {:?}",
            record.oid(),
            String::from_utf8_lossy(record.data()),
            record.refs().collect::<Vec<_>>()
        );
    }
    Ok(())
}
