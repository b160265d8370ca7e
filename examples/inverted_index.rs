//! An inverted index in the object layer: which documents contain which
//! word, in one persistent map of (word, document) pairs, larger than
//! memory if need be.
//!
//! The corpus is generated: document `d` contains the word `w<K>` exactly
//! when `d % K == 0`, for every K from 1 to 1000.
//!
//! ```text
//! cargo run --release --example inverted_index -- index --docs 0..50000 --store index.redb
//! cargo run --release --example inverted_index -- query w7 --store index.redb
//! # or through a server, several indexers at once:
//! durus-redb serve --file index.redb --port 2972 &
//! cargo run --release --example inverted_index -- index --docs 0..50000 --server 127.0.0.1:2972 &
//! cargo run --release --example inverted_index -- index --docs 50000..100000 --server 127.0.0.1:2972
//! cargo run --release --example inverted_index -- query w7 --server 127.0.0.1:2972
//! ```
//!
//! Indexers that run at once conflict on the map's nodes (every
//! transaction changes the map's header, its size): their transactions
//! are run again, so they mostly take turns, and no posting is lost.

use std::error::Error;
use std::ops::Range;

use durus_redb::object::{Db, ObjectError, PMap, Persistent};
use durus_redb::{ClientStorage, Options, RedbStorage, Storage};
use serde::{Deserialize, Serialize};

/// Words of the corpus: w1 to w1000.
pub const WORDS: u64 = 1000;

/// Documents indexed per transaction.
pub const DOCS_PER_COMMIT: u64 = 50;

/// The root: (word, document) pairs.
#[derive(Clone, Serialize, Deserialize)]
pub struct Index {
    pub postings: PMap<(String, u64), ()>,
}

impl Persistent for Index {
    const TAG: &'static str = "example.InvertedIndex";
}

/// The words of document `d`.
pub fn words_of(d: u64) -> impl Iterator<Item = String> {
    (1..=WORDS)
        .filter(move |k| d.is_multiple_of(*k))
        .map(|k| format!("w{k}"))
}

/// The index, made if the store has none.
pub fn index_of<S: Storage>(db: &mut Db<S>) -> Result<Index, ObjectError> {
    db.transact(|tx| {
        if let Some(index) = tx.root::<Index>()? {
            return Ok((*index).clone());
        }
        let index = Index {
            postings: PMap::new(tx)?,
        };
        tx.set_root(index.clone())?;
        Ok(index)
    })
}

/// Adds documents `docs` to the index, [`DOCS_PER_COMMIT`] a transaction.
pub fn index<S: Storage>(db: &mut Db<S>, docs: Range<u64>) -> Result<u64, ObjectError> {
    let index = index_of(db)?;
    let mut postings = 0;
    let mut at = docs.start;
    while at < docs.end {
        let end = (at + DOCS_PER_COMMIT).min(docs.end);
        postings += db.transact(|tx| {
            let mut added = 0;
            for d in at..end {
                for w in words_of(d) {
                    index.postings.insert(tx, (w, d), ())?;
                    added += 1;
                }
            }
            Ok(added)
        })?;
        at = end;
    }
    Ok(postings)
}

/// How many documents contain `word`.
pub fn count<S: Storage>(db: &mut Db<S>, word: &str) -> Result<u64, ObjectError> {
    let index = index_of(db)?;
    db.transact(|tx| {
        let mut n = 0;
        let from = (word.to_string(), 0);
        let to = (word.to_string(), u64::MAX);
        index.postings.for_each_in(tx, from..=to, |_, _| {
            n += 1;
            true
        })?;
        Ok(n)
    })
}

fn usage() -> ! {
    eprintln!(
        "usage: inverted_index index --docs A..B (--store PATH | --server HOST:PORT)\n       \
         inverted_index query WORD (--store PATH | --server HOST:PORT)"
    );
    std::process::exit(2)
}

fn run<S: Storage>(mut db: Db<S>, command: &str, arg: &str) -> Result<(), Box<dyn Error>> {
    // Every transaction changes the map's header (its size): indexers at
    // once conflict often, and take turns.
    db.set_tries(10_000);
    match command {
        "index" => {
            let (a, b) = arg.split_once("..").unwrap_or_else(|| usage());
            let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
            let started = std::time::Instant::now();
            let n = index(&mut db, a..b)?;
            println!(
                "indexed documents {a}..{b}: {n} postings in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        "query" => println!("{}", count(&mut db, arg)?),
        _ => usage(),
    }
    db.storage().close()?;
    Ok(())
}

#[allow(dead_code)] // also compiled into tests/objects.rs, which has its own main
fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or_else(|| usage());
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let arg = match command {
        "index" => value("--docs").unwrap_or_else(|| usage()),
        "query" => args.get(1).cloned().unwrap_or_else(|| usage()),
        _ => usage(),
    };
    match (value("--store"), value("--server")) {
        (Some(path), None) => {
            let store = RedbStorage::open(path, Options::default())?;
            run(Db::new(store), command, &arg)
        }
        (None, Some(at)) => {
            let (host, port) = at.rsplit_once(':').unwrap_or_else(|| usage());
            let client = ClientStorage::connect_tcp(host, port.parse()?)?;
            run(Db::new(client), command, &arg)
        }
        _ => usage(),
    }
}
