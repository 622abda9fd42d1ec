//! The command line's output. `println!` and `eprintln!` panic when their
//! stream is a pipe whose reader has gone (`cachegate config | head -1`);
//! these end the process quietly instead (stdout), as `head` expects of
//! what it reads from, or drop the message (stderr: nowhere left to say it).

use std::io::Write;

/// Write `text` (and nothing else) to stdout and flush it. When the reader
/// has gone, exit at once with status 0: everything the command did is
/// done, only its report has no reader. Any other write error (a full
/// disk) exits with status 1 and says so on stderr.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "cachegate: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// [`print`] `line` and a newline.
pub fn println(line: &str) {
    print(&format!("{line}\n"));
}

/// Write `text` to stderr; a failure is ignored (there is nowhere left to
/// report it).
pub fn eprint(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// [`eprint`] `line` and a newline.
pub fn eprintln(line: &str) {
    eprint(&format!("{line}\n"));
}
