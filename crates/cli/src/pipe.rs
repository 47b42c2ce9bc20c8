//! A closed stdout (`demovlp search --json | head -1`) ends the command quietly with exit
//! status 0: the panic `println!` raises on a broken pipe and an error whose cause is a
//! broken pipe are both turned into a normal exit, for every command.

use std::io::ErrorKind;

fn is_broken_pipe_message(msg: &str) -> bool {
    msg.contains("Broken pipe") || msg.contains("os error 32")
}

/// Installs the panic hook; call first thing in `main`.
pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied()).unwrap_or("");
        if msg.starts_with("failed printing to std") && is_broken_pipe_message(msg) {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// `main`'s result, with an error caused by a broken pipe turned into success.
pub fn finish(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)) => {
            std::process::exit(0)
        }
        r => r,
    }
}
