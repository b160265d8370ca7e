#!/usr/bin/env python3
"""Run the interop scenarios (interop.py) against a Durus-protocol server
started from a command line, and optionally compare two servers.

    run_against.py --server-cmd "durus -s --file {file} --port {port}"
    run_against.py --server-cmd "durus -s --file {file} --address {address}"
    run_against.py --server-cmd "durus-redb serve --file {file} --port {port}" \\
                   --compare-cmd "durus -s --file {file} --port {port}"

Placeholders in a command: {file} (a store file in a new temporary
directory), {dir} (that directory), {port} (a free TCP port on 127.0.0.1),
{port2} (a second free port, for a command that starts two servers of one
store: the scenarios' connections then alternate between {port} and it),
{host} (127.0.0.1), {address} (a Unix socket path in that directory; if the
command uses it, the scenarios connect with --address instead of TCP),
{python} (the python running interop.py).

Every scenario gets a fresh server in a fresh directory (or, with
--shared-server, all scenarios run one after another on one server).
The server must accept connections within --start-timeout seconds.  It is
stopped with the protocol's `Q` command, then SIGTERM, then SIGKILL, each
after a bounded wait: no server is ever left running.

Prints interop.py's JSON lines on stdout.  With --compare-cmd, runs the same
scenarios against both servers, and exits 1 with a diff if the outputs are
not identical.  Exit status 1 also if any scenario failed on any server or a
server did not start.  Standard library only.
"""

import argparse
import difflib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
INTEROP = os.path.join(HERE, "interop.py")
HOST = "127.0.0.1"

# Servers started and not yet stopped; stopped on any exit.
_running = []


def log(message, *args):
    sys.stderr.write("run_against: " + (message % args if args else message)
                     + "\n")
    sys.stderr.flush()


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def connect(server):
    """A connected socket to the server, or None."""
    if server.address:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = server.address
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (HOST, server.port)
    s.settimeout(2.0)
    try:
        s.connect(target)
        return s
    except (OSError, socket.timeout):
        s.close()
        return None


class Server(object):

    def __init__(self, command, python, label):
        self.command = command
        self.label = label
        self.dir = tempfile.mkdtemp(prefix="durus-interop-")
        self.file = os.path.join(self.dir, "store.db")
        self.logfile = os.path.join(self.dir, "server.log")
        self.uses_address = "{address}" in command
        self.address = (os.path.join(self.dir, "s.sock")
                        if self.uses_address else None)
        self.port = None if self.uses_address else free_port()
        # {port2}: a second server of the same store (another front end);
        # the scenarios' connections alternate between the two.
        self.port2 = free_port() if "{port2}" in command else None
        values = {"file": self.file, "dir": self.dir, "port": self.port,
                  "port2": self.port2,
                  "host": HOST, "address": self.address, "python": python}
        try:
            self.argv = [arg.format(**values)
                         for arg in shlex.split(command)]
        except (KeyError, IndexError, ValueError) as exc:
            raise SystemExit("run_against: bad placeholder in %r: %s"
                             % (command, exc))
        # The server runs in its temporary directory: resolve a relative
        # program path against the directory we were started from.
        program = self.argv[0]
        if os.sep in program:
            program = os.path.abspath(program)
        resolved = shutil.which(program)
        if resolved is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SystemExit("run_against: server program %r not found or "
                             "not executable" % self.argv[0])
        self.argv[0] = resolved
        self.process = None

    def interop_args(self):
        if self.address:
            return ["--address", self.address]
        args = ["--host", HOST, "--port", str(self.port)]
        if self.port2 is not None:
            args += ["--also-port", str(self.port2)]
        return args

    def start(self, timeout):
        log("[%s] starting: %s", self.label, " ".join(
            shlex.quote(a) for a in self.argv))
        self.log_handle = open(self.logfile, "wb")
        try:
            self.process = subprocess.Popen(
                self.argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                stdout=self.log_handle, stderr=subprocess.STDOUT,
                start_new_session=True)
        except OSError as exc:
            raise StartError("cannot run %r: %s" % (self.argv[0], exc))
        _running.append(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise StartError("server exited with status %s before "
                                 "accepting connections" %
                                 self.process.returncode)
            s = connect(self)
            if s is not None:
                s.close()
                return
            if time.monotonic() >= deadline:
                raise StartError("server did not accept connections "
                                 "within %.0f s" % timeout)
            time.sleep(0.1)

    def stop(self, grace=10.0):
        """Stop the server: `Q`, then SIGTERM, then SIGKILL.  Returns a
        description of how it stopped."""
        if self.process is None:
            return "not started"
        how = None
        try:
            if self.process.poll() is None:
                s = connect(self)
                if s is not None:
                    try:
                        s.sendall(b"Q")
                    except OSError:
                        pass
                    finally:
                        s.close()
                    if self._wait(grace):
                        how = "Q"
            else:
                how = "already exited (status %s)" % self.process.returncode
            if how is None:
                self._signal(signal.SIGTERM)
                if self._wait(5.0):
                    how = "SIGTERM"
            if how is None:
                self._signal(signal.SIGKILL)
                self._wait(5.0)
                how = "SIGKILL"
        finally:
            if self in _running:
                _running.remove(self)
            self.log_handle.close()
        return how

    def _wait(self, timeout):
        try:
            self.process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _signal(self, signum):
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def log_tail(self, lines=30):
        try:
            with open(self.logfile, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cleanup(self, keep):
        if keep:
            log("[%s] kept %s", self.label, self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class StartError(Exception):
    pass


def stop_all():
    for server in list(_running):
        server.stop(grace=3.0)


def _on_signal(signum, frame):
    stop_all()
    raise SystemExit(128 + signum)


def run_batch(command, scenarios, options, label):
    """Start a server, run `scenarios` on it, stop it.  Returns
    (json lines, ok)."""
    server = Server(command, options.python, label)
    ok = True
    lines = []
    try:
        try:
            server.start(options.start_timeout)
        except StartError as exc:
            log("[%s] ERROR: %s\n--- server log ---\n%s", label, exc,
                server.log_tail())
            raise StartError(str(exc))
        argv = [options.python, INTEROP] + server.interop_args()
        for s in scenarios:
            argv += ["--scenario", s]
        argv += ["--pack-timeout", str(options.pack_timeout)]
        argv += options.interop_arg
        # interop.py runs in its own process group, so that on a timeout
        # its worker processes (many_clients) are killed too.
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE,
                                 start_new_session=True)
        try:
            out, _ = child.communicate(timeout=options.scenario_timeout *
                                       len(scenarios))
            out = out.decode("utf-8", "replace")
            lines = [l for l in out.splitlines() if l.strip()]
            if child.returncode != 0:
                ok = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.communicate()
            log("[%s] ERROR: interop.py timed out after %.0f s", label,
                options.scenario_timeout * len(scenarios))
            lines = [json.dumps({"scenario": s, "ok": False,
                                 "error": "timeout"}, sort_keys=True)
                     for s in scenarios]
            ok = False
        if server.process.poll() is not None:
            log("[%s] ERROR: server died during the run (status %s)",
                label, server.process.returncode)
            ok = False
    finally:
        how = server.stop()
        log("[%s] server stopped (%s)", label, how)
        if not ok:
            log("[%s] --- server log (tail) ---\n%s", label,
                server.log_tail())
        server.cleanup(options.keep or not ok)
    seen = [json.loads(l).get("scenario") for l in lines
            if l.startswith("{")]
    if seen != list(scenarios):
        log("[%s] ERROR: expected results for %s, got %s", label,
            scenarios, seen)
        ok = False
    return lines, ok


def run_all(command, options, label):
    batches = ([options.scenarios] if options.shared_server
               else [[s] for s in options.scenarios])
    lines, ok = [], True
    for batch in batches:
        try:
            more, this_ok = run_batch(command, batch, options, label)
        except StartError:
            # The server does not start: do not try again for every
            # remaining scenario.
            done = [json.loads(l)["scenario"] for l in lines]
            lines += [json.dumps({"scenario": s, "ok": False,
                                  "error": "server did not start"},
                                 sort_keys=True)
                      for s in options.scenarios if s not in done]
            return lines, False
        lines += more
        ok = ok and this_ok
    return lines, ok


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--server-cmd", required=True,
                        help="command starting the server under test")
    parser.add_argument("--compare-cmd", default=None,
                        help="a second server command; outputs must match")
    parser.add_argument("--scenario", action="append", default=None,
                        help="scenario to run (repeatable; default all)")
    parser.add_argument("--python", default=os.environ.get(
        "DURUS_PYTHON", sys.executable),
        help="python with durus, runs interop.py (default $DURUS_PYTHON "
             "or this python)")
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--scenario-timeout", type=float, default=300.0,
                        help="seconds allowed per scenario")
    parser.add_argument("--pack-timeout", type=float, default=20.0)
    parser.add_argument("--interop-arg", action="append", default=[],
                        help="an argument passed on to interop.py "
                        "(repeatable), e.g. --interop-arg=--snapshot-reads")
    parser.add_argument("--shared-server", action="store_true",
                        help="run all scenarios on one server")
    parser.add_argument("--quiet", action="store_true",
                        help="print only failed scenarios and diffs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directories")
    options = parser.parse_args(argv)

    listing = subprocess.run([options.python, INTEROP, "--list"],
                             stdout=subprocess.PIPE, timeout=60)
    if listing.returncode != 0:
        raise SystemExit("run_against: %s cannot run interop.py (is durus "
                         "installed? run scripts/setup-python.sh)"
                         % options.python)
    known = listing.stdout.decode().split()
    if not options.scenario or "all" in options.scenario:
        options.scenarios = known
    else:
        unknown = [s for s in options.scenario if s not in known]
        if unknown:
            parser.error("unknown scenario(s) %s; known: %s"
                         % (", ".join(unknown), ", ".join(known)))
        options.scenarios = options.scenario

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        lines, ok = run_all(options.server_cmd, options, "server")
        for line in lines:
            if not options.quiet or '"ok": false' in line:
                sys.stdout.write(line + "\n")
        sys.stdout.flush()
        not_started = all('"server did not start"' in l for l in lines)
        if options.compare_cmd is not None and not_started:
            log("server under test did not start: not running "
                "--compare-cmd")
        elif options.compare_cmd is not None:
            other, other_ok = run_all(options.compare_cmd, options,
                                      "compare")
            ok = ok and other_ok
            if other != lines:
                def pretty(ls):
                    out = []
                    for l in ls:
                        try:
                            out += json.dumps(json.loads(l), indent=1,
                                              sort_keys=True).splitlines()
                        except ValueError:
                            out.append(l)
                    return out
                diff = difflib.unified_diff(
                    pretty(other), pretty(lines), "compare-cmd",
                    "server-cmd", lineterm="", n=3)
                sys.stdout.write("OUTPUTS DIFFER (--- compare-cmd, "
                                 "+++ server-cmd):\n")
                sys.stdout.write("\n".join(diff) + "\n")
                ok = False
            else:
                log("outputs identical (%d scenarios)", len(lines))
    finally:
        stop_all()
    log("%s", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
