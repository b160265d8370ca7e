//! Starts a durus-redb server on a temporary store, in this process, and runs
//! a `ClientStorage` against it over TCP: commit a small graph, read it back
//! from a second client, see the first client's change invalidated for the
//! second, then shut the server down.
//!
//! `cargo run --example server`

use std::error::Error;

use durus_redb::{
    Address, ClientStorage, Oid, Options, Record, RedbStorage, Server, ServerConfig, Storage,
};

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = RedbStorage::open(dir.path().join("example.redb"), Options::default())?;
    let config = ServerConfig::new(Address::tcp("127.0.0.1", 0)); // any free port
    let server = Server::bind(&store, config)?;
    drop(store); // the server holds the store from here on
    let Address::Tcp { port, .. } = server.address().clone() else {
        unreachable!("a TCP address was asked for")
    };
    let shutdown = server.shutdown_handle();
    let running = std::thread::spawn(move || server.run());

    let mut a = ClientStorage::connect_tcp("127.0.0.1", port)?;
    let root = a.new_oid()?;
    assert_eq!(root, Oid::ROOT);
    let child = a.new_oid()?;
    a.begin();
    a.store(child, Record::new(child, b"hello", &[]).into_bytes())?;
    a.store(root, Record::new(root, b"root", &[child]).into_bytes())?;
    a.end()?;
    println!("client a committed the root and {child}");

    let mut b = ClientStorage::connect_tcp("127.0.0.1", port)?;
    let seen: Vec<String> = b
        .traverse(Oid::ROOT)
        .map(|r| r.map(|r| format!("{}: {:?}", r.oid(), String::from_utf8_lossy(r.data()))))
        .collect::<Result<_, _>>()?;
    println!("client b reads the graph: {seen:?}");

    a.begin();
    a.store(child, Record::new(child, b"changed", &[]).into_bytes())?;
    a.end()?;
    println!(
        "client a changed {child}; client b's sync says: {:?}",
        b.sync()?
    );
    println!(
        "client b reads it again: {:?}",
        String::from_utf8_lossy(b.load(child)?.data())
    );

    shutdown.shutdown();
    running.join().expect("server thread")?;
    println!("server stopped; the store was checkpointed and closed");
    Ok(())
}
