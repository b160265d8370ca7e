//! `durus-redb stop`: asks a running server to stop (`Q`), and waits until
//! it has.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::common::*;

/// Sends `Q`, then waits up to `wait` seconds (the server's commits in
/// flight finish, its store is checkpointed and closed) for nothing to
/// accept connections there any more.
pub(crate) fn stop(at: ConnectArgs, wait: f64) -> ExitCode {
    if !(wait >= 0.0 && wait.is_finite()) {
        return fail("--wait must be a number of seconds, 0 or more");
    }
    let stopping = Duration::from_secs_f64(wait);
    let address = at.address();
    if let Err(e) = at
        .connect()
        .and_then(|c| c.stop_server().map_err(|e| e.to_string()))
    {
        return fail(format_args!("no server answers on {address}: {e}"));
    }
    // `Q` has no answer: the server is stopped once nothing accepts there.
    let deadline = Instant::now() + stopping;
    loop {
        if at.connect().is_err() {
            println!("the server on {address} stopped");
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fail(format_args!(
        "the server on {address} still accepts connections {wait} s after it was asked to \
         stop: it may refuse Q from here (serve --admin-from), or be slow to stop; see its log"
    ))
}
