//! `durus-redb stop`: asks a running server to stop (`Q`).

use std::process::ExitCode;

use durus_redb::ClientStorage;

use crate::common::*;

pub(crate) fn stop(at: ConnectArgs) -> ExitCode {
    let address = at.address();
    match ClientStorage::connect(address.clone()).and_then(|c| c.stop_server()) {
        Ok(()) => {
            println!("asked the server on {address} to stop");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format_args!("no server answers on {address}: {e}")),
    }
}
